"""`filterd-train`, installed as `filterd.trainer`: it uses filterd's text and model layers,
never the engine, the daemon or the CLI."""
