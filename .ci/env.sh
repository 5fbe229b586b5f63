# Sourced by .ci/run and .ci/compat: a fresh virtual environment and fastdpo installed into it with its test extras.

# fastdpo_fresh_venv DIR [PYTHON]: DIR removed, made anew with PYTHON (default python3) and activated.
fastdpo_fresh_venv() {
    rm -rf "$1"
    "${2:-python3}" -m venv "$1"
    # shellcheck disable=SC1091
    source "$1/bin/activate"
}

# fastdpo_install PIN...: the pins installed first (torch's build among them: a bare `torch` requirement pulls the
# registry's default build), then the project with its test extras (".[test]", built in isolation: a fresh venv's
# own setuptools is too old for the SPDX licence string) with the pins held as constraints.
fastdpo_install() {
    local pins
    pins=$(mktemp)
    printf '%s\n' "$@" > "$pins"
    python -m pip install --quiet --progress-bar off "$@" \
        && python -m pip install --quiet --progress-bar off -c "$pins" ".[test]"
    local rc=$?
    rm -f "$pins"
    return $rc
}
