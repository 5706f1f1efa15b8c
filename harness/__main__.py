import sys

from harness import warmstart

# In a pipeline that `flowad repro` runs, a warm server holds the heavy imports (harness.warmstart).
status = warmstart.run(sys.argv[1:])
if status is None:
    from harness.cli import main

    status = main()
sys.exit(status)
