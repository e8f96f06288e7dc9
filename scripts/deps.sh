#!/bin/sh
# Installs the Debian packages the build needs, when missing. Needs root (or sudo) the
# first time only.
set -e
need=""
for p in gcc make libuv1-dev libjansson-dev node-llhttp python3; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
done
[ -z "$need" ] && exit 0
echo "deps: installing$need" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq $need >/dev/null
