# Sourced by hack/tools.sh and hack/test-cluster.sh: apt-get with a private state folder (so /etc/apt
# and the system's package lists stay untouched) that reads the machine's own package sources, so
# its mirror is used; /etc/apt/apt.conf.d, which apt still reads, keeps its proxy and credentials
# settings. DEBIAN_MIRROR, when set, names a Debian bookworm mirror instead.

# private_sources DIR: the machine's sources (with deb-src beside each deb) in DIR/sources.
private_sources() {
  local dir=$1 f name
  rm -rf "$dir/sources" && mkdir -p "$dir/sources"
  if [ -n "${DEBIAN_MIRROR:-}" ]; then
    for t in deb deb-src; do
      echo "$t [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_MIRROR bookworm main"
    done > "$dir/sources/mirror.list"
    return
  fi
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    sed -E 's/^Types:[[:space:]]*deb[[:space:]]*$/Types: deb deb-src/' "$f" > "$dir/sources/$(basename "$f")"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .list)
    sed -nE 's/^[[:space:]]*deb[[:space:]]+(.*)$/deb \1\ndeb-src \1/p' "$f" > "$dir/sources/$name.list"
  done
  if ! cat "$dir"/sources/* 2>/dev/null | grep -Eq '^(deb|URIs)'; then
    echo "no package sources in /etc/apt: set DEBIAN_MIRROR to a Debian bookworm mirror" >&2
    return 1
  fi
}

# apt_private DIR ARGS...: apt-get ARGS with DIR's sources, lists and cache.
apt_private() {
  local dir=$1; shift
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  : > "$dir/none.list"
  apt-get -q -o Dir::Etc::sourcelist="$dir/none.list" -o Dir::Etc::sourceparts="$dir/sources" \
    -o Dir::State::Lists="$dir/lists" -o Dir::Cache="$dir/cache" -o APT::Sandbox::User=root "$@"
}
