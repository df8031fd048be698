# Shared by Scripts/serve, Scripts/test and Scripts/bench: installs what is missing and finds free ports.
# shellcheck shell=bash

# Swift lives in /opt/swift on this project's machines.
if ! command -v swift >/dev/null 2>&1 && [ -x /opt/swift/usr/bin/swift ]; then
  export PATH="/opt/swift/usr/bin:$PATH"
fi

# install_packages PKG...: apt-get installs the packages that are not installed yet.
install_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing: ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# free_port: prints a TCP port on 127.0.0.1 that nothing listens on.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_for_port PORT [SECONDS]: waits until something accepts connections on 127.0.0.1:PORT.
wait_for_port() {
  local port=$1 limit=${2:-20} i=0
  while ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    i=$((i + 1))
    [ $i -gt $((limit * 10)) ] && return 1
    sleep 0.1
  done
}

BASE_PACKAGES=(libhiredis-dev libcurl4-openssl-dev zlib1g-dev libbrotli-dev redis-server python3 openssl curl nghttp2-client)
