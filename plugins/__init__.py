"""filterd's built-in plugins, installed as `filterd.builtin` and registered through entry
points exactly as a third party's would be: sources, actions and checks."""
