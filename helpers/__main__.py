"""`python -m helpers train|test|predict`: see helpers/cli.py."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
