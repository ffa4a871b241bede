"""A Sphinx extension for the course's site: sphinx-thebe's inline settings without `const`.

Jupyter Book 1 always loads sphinx-thebe, and the page template writes its inline settings
script twice; with `const` the second copy throws "Identifier 'THEBE_JS_URL' has already been
declared" in the browser's console on every page. With `var` the repeat is harmless.
"""


def use_var(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files", [])
    for i, script in enumerate(scripts):
        body = getattr(script, "attributes", {}).get("body", "")
        if "const THEBE_JS_URL" in body:
            attributes = {**script.attributes, "body": body.replace("const ", "var ")}
            scripts[i] = type(script)(script.filename, priority=script.priority, **attributes)


def setup(app):
    app.connect("html-page-context", use_var, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
