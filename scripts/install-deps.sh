#!/usr/bin/env bash
# install-deps.sh cmd:package ...: installs with apt-get the Debian packages
# whose commands are missing. Needs root when anything is missing.
set -euo pipefail
missing=()
for pair in "$@"; do
	cmd=${pair%%:*} pkg=${pair#*:}
	command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" -ne 0 ]; then
	echo "missing packages: $pkgs; run as root (e.g. sudo make test) so they can be installed with apt-get" >&2
	exit 1
fi
echo "installing: $pkgs"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $pkgs
