"""`python -m composer ...` is `compose ...`; launchers need a module: `accelerate launch -m
composer train RECIPE --from-cache`."""

from cli import main

main()
