from normlab.cli import entry

entry()
