# find_python X.Y: the path of a Python X.Y interpreter: pythonX.Y on PATH, else pyenv's newest X.Y.
find_python() {
  local version=$1 found
  if found=$(command -v "python$version") && "$found" -c "" 2>/dev/null; then
    echo "$found"; return
  fi
  if command -v pyenv >/dev/null; then
    found=$(pyenv versions --bare 2>/dev/null | grep -E "^${version//./\\.}\.[0-9]+$" | sort -V | tail -1)
    if [ -n "$found" ] && [ -x "$(pyenv root)/versions/$found/bin/python$version" ]; then
      echo "$(pyenv root)/versions/$found/bin/python$version"; return
    fi
  fi
  echo "error: no Python $version found (install it, e.g. pyenv install $version)" >&2
  return 1
}
