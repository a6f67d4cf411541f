#!/usr/bin/env bash
# The linters CI runs: ruff (lint and format) over the project, mypy over the package.
source "$(dirname "$0")/env.sh" test "[test]"
ruff check .
ruff format --check .
mypy
