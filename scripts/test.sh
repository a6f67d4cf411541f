#!/usr/bin/env bash
# The test suite: install the package with its test extras, then run every test.
source "$(dirname "$0")/env.sh" test "[test]"
python -m pytest -q "$@"
