# Sourced by scripts/start and scripts/test: make .venv and install a requirements file into it
# when that file changed since the last install.
ensure_venv() {
  local requirements="$1"
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    python3 -m venv .venv
  fi
  local stamp=".venv/.installed-$(basename "$requirements")"
  if [ ! -f "$stamp" ] || ! cmp -s <(cat requirements*.txt) "$stamp"; then
    echo "==> installing $requirements (torch is large; the first run takes a few minutes)"
    .venv/bin/pip install --quiet --disable-pip-version-check -r "$requirements"
    cat requirements*.txt > "$stamp"
  fi
  export PATH="$PWD/.venv/bin:$PATH"
}
