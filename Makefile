# sandboxd build. `make run` starts the daemon, `make test` runs every test suite.
# Dependencies are Debian packages, installed by scripts/deps.sh when missing (as root).

CC       ?= cc
BUILD    ?= build
LLHTTP_SRC := /usr/share/llhttp
LLHTTP_INC := /usr/share/include/llhttp

WARN   := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wformat=2 \
          -Wno-unused-parameter
WERROR ?= -Werror
OPT    ?= -O2 -g
CPPFLAGS_ALL := -D_GNU_SOURCE -Isrc -I$(LLHTTP_INC)
CFLAGS_ALL   := -std=c17 $(OPT) $(WARN) $(WERROR) -fno-strict-aliasing $(EXTRA_CFLAGS)
LDLIBS_ALL   := -Wl,-Bstatic -luv_a -ljansson -Wl,-Bdynamic

# Release objects carry no unwind tables (C needs none; debuggers and perf read .debug_frame
# from the unstripped binary) and one section per function, so the link drops what nothing
# calls: the binary's mapped pages are most of the idle daemon's RSS (docs/decisions.md).
REL_CFLAGS  := -fno-asynchronous-unwind-tables -fno-unwind-tables -ffunction-sections -fdata-sections
REL_LDFLAGS := -Wl,--gc-sections

SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

# Everything under src/ except main.c is the library the daemon and the unit tests share.
LIB_SRC  := $(sort $(filter-out src/main.c,$(wildcard src/*/*.c)))
UNIT_SRC := $(sort $(wildcard tests/unit/*.c))
LLHTTP_C := $(LLHTTP_SRC)/api.c $(LLHTTP_SRC)/http.c $(LLHTTP_SRC)/llhttp.c

PORT ?= 9501
STATE_DIR ?= /var/tmp/sandboxd-state

.PHONY: all deps run test unit asan bench clean check-style sdk-deps

# The Debian packages are installed while the Makefile is read, before any rule is looked
# at: make caches directory listings, so a rule whose prerequisite (llhttp's C sources in
# /usr/share/llhttp) appears only after make has started would not be found.
ifeq ($(filter clean,$(MAKECMDGOALS)),)
ifneq ($(shell scripts/deps.sh >&2 && echo ok),ok)
$(error scripts/deps.sh could not install the build dependencies)
endif
endif

all: $(BUILD)/sandboxd

deps:
	@scripts/deps.sh

# ---- release build ----
$(BUILD)/obj/%.o: %.c $(wildcard src/*/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS_ALL) $(CFLAGS_ALL) $(REL_CFLAGS) -c -o $@ $<

$(BUILD)/obj/llhttp/%.o: $(LLHTTP_SRC)/%.c
	@mkdir -p $(dir $@)
	$(CC) -I$(LLHTTP_INC) -O2 -g -w $(REL_CFLAGS) -c -o $@ $<

LIB_OBJ    := $(LIB_SRC:%.c=$(BUILD)/obj/%.o) $(patsubst $(LLHTTP_SRC)/%.c,$(BUILD)/obj/llhttp/%.o,$(LLHTTP_C))
UNIT_OBJ   := $(UNIT_SRC:%.c=$(BUILD)/obj/%.o)

$(BUILD)/sandboxd: $(BUILD)/obj/src/main.o $(LIB_OBJ)
	$(CC) $(CFLAGS_ALL) $(REL_LDFLAGS) -o $@ $^ $(LDLIBS_ALL)

$(BUILD)/test_unit: $(UNIT_OBJ) $(LIB_OBJ)
	$(CC) $(CFLAGS_ALL) -o $@ $^ $(LDLIBS_ALL)

# ---- sanitizer build (ASan + UBSan), same sources, own object dir ----
ASAN_DIR := $(BUILD)/asan
$(ASAN_DIR)/obj/%.o: %.c $(wildcard src/*/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS_ALL) $(CFLAGS_ALL) -O1 $(SAN_FLAGS) -c -o $@ $<

$(ASAN_DIR)/obj/llhttp/%.o: $(LLHTTP_SRC)/%.c
	@mkdir -p $(dir $@)
	$(CC) -I$(LLHTTP_INC) -O1 -g -w $(SAN_FLAGS) -c -o $@ $<

ASAN_LIB_OBJ  := $(LIB_SRC:%.c=$(ASAN_DIR)/obj/%.o) $(patsubst $(LLHTTP_SRC)/%.c,$(ASAN_DIR)/obj/llhttp/%.o,$(LLHTTP_C))
ASAN_UNIT_OBJ := $(UNIT_SRC:%.c=$(ASAN_DIR)/obj/%.o)

$(ASAN_DIR)/sandboxd: $(ASAN_DIR)/obj/src/main.o $(ASAN_LIB_OBJ)
	$(CC) $(SAN_FLAGS) -o $@ $^ $(LDLIBS_ALL)

$(ASAN_DIR)/test_unit: $(ASAN_UNIT_OBJ) $(ASAN_LIB_OBJ)
	$(CC) $(SAN_FLAGS) -o $@ $^ $(LDLIBS_ALL)

asan: $(ASAN_DIR)/sandboxd $(ASAN_DIR)/test_unit

# ---- running ----
run: all
	@mkdir -p $(STATE_DIR)
	$(BUILD)/sandboxd --listen 127.0.0.1:$(PORT) --state-dir $(STATE_DIR)

unit: $(BUILD)/test_unit
	$(BUILD)/test_unit

# All suites: unit (plain and sanitized), integration against the plain and the sanitized
# daemon, and the vendors' SDKs. Prints one closing "N passed, N failed" line.
test: $(BUILD)/sandboxd $(BUILD)/test_unit $(ASAN_DIR)/sandboxd $(ASAN_DIR)/test_unit
	@scripts/run-tests.sh

sdk-deps:
	@scripts/sdk-deps.sh

# Benchmark (not part of `make test`): floor + daemon, a few minutes, 127.0.0.1 only.
# `make bench BENCH_ARGS=--quick` for a ~30 s smoke run; see bench/README.md.
BENCH_ARGS ?=
bench: all
	@$(MAKE) -s -C bench
	python3 bench/bench.py --daemon $(BUILD)/sandboxd $(BENCH_ARGS)

clean:
	rm -rf $(BUILD)
