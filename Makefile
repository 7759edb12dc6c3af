# One-line targets; `make demo` and `make test` do all set-up on a fresh machine.
PY ?= python
DEMO := .cache/demo

.PHONY: setup demo test test-fast lint fmt bench-convert

setup:  ## build-time + dev + serve install (torch CPU build from this machine's disk), chromium, the CLIP vocabulary wheel
	$(PY) -m pip install -q -e '.[convert,dev,serve,ray]'
	@# the page's browser test: Debian's chromium and its driver (browsers fetched by playwright cannot be here)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0

demo: setup  ## tiny random-weight SDXL -> OpenVINO -> demo.png
	$(PY) -m convert.demo --out $(DEMO)

test: setup  ## lint + the whole suite (includes the torch-free runtime check), on 2 workers (pytest-xdist)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-fast: setup  ## lint + the fast tier (one parity case, schedulers, RNG, parameter and CLI errors)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow"

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

fmt:
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

bench-convert:  ## full-size random-weight conversions: time, peak RSS, IR size per submodel
	$(PY) -m benchmarks.convert_real
