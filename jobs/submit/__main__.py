"""`python -m jobs.submit`: the job's command line, with the project's exit codes."""
from jobs.cli import run
from jobs.submit import main

run(main)
