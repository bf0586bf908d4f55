"""The `segrl` subcommands by group. Importing the package registers every command in
`registry.COMMANDS`, in the order below, which is the order `segrl --help` lists them."""
from pipelines.commands import setup, training, analysis, serving, main_job  # noqa: F401, I001
