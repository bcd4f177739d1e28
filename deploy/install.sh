#!/bin/sh
# Install Shopfloor Gateway on an edge PC (Debian/Ubuntu with systemd), as root:
#
#   sudo deploy/install.sh            # from a checkout of the repository
#
# What it does (each step is safe to repeat; an upgrade is the same command):
#   1. installs python3-venv if missing,
#   2. creates the system group `shopfloor` with gid 10001 (the group the container image
#      runs as, so the image can read /etc/shopfloor) and the system user `shopfloor`,
#   3. creates a virtual environment in /opt/shopfloor and installs the gateway into it,
#   4. puts an example config in /etc/shopfloor/ (never overwrites yours),
#   5. installs and enables the systemd unit (starts it only when asked: --start).
#
# Options: --prefix DIR (default /opt/shopfloor), --config-dir DIR (default /etc/shopfloor),
#          --with-influxdb (the optional history sink), --start, --no-systemd,
#          --gid GID (group id of `shopfloor`, default 10001; build the image with the same
#          --build-arg GID=GID if you change it).
set -eu

PREFIX=/opt/shopfloor
CONFIG_DIR=/etc/shopfloor
EXTRAS=""
START=no
SYSTEMD=yes
# The container image (deploy/Containerfile) runs as uid 10001, gid 10001: a host group
# with that gid lets the image read the 0640 root:shopfloor files of the config dir.
GID=10001
SRC=$(cd "$(dirname "$0")/.." && pwd)

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=$2; shift 2 ;;
    --config-dir) CONFIG_DIR=$2; shift 2 ;;
    --with-influxdb) EXTRAS="[influxdb]"; shift ;;
    --start) START=yes; shift ;;
    --no-systemd) SYSTEMD=no; shift ;;
    --gid) GID=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '==> %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo $0)" >&2
  exit 1
fi
if [ ! -f "$SRC/pyproject.toml" ]; then
  echo "install.sh: run it from a checkout of the repository ($SRC has no pyproject.toml)" >&2
  exit 1
fi

if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  say "installing python3-venv"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi

case "$GID" in
  ''|*[!0-9]*) echo "install.sh: --gid needs a number, got '$GID'" >&2; exit 2 ;;
esac
if ! getent group shopfloor >/dev/null; then
  if getent group "$GID" >/dev/null; then
    echo "install.sh: gid $GID is taken by group $(getent group "$GID" | cut -d: -f1);" \
      "choose a free one with --gid (and build the image with --build-arg GID=...)" >&2
    exit 1
  fi
  say "creating system group shopfloor (gid $GID)"
  groupadd --system --gid "$GID" shopfloor
fi
HAVE_GID=$(getent group shopfloor | cut -d: -f3)
if [ "$HAVE_GID" != "$GID" ]; then
  echo "    note: group shopfloor has gid $HAVE_GID, not $GID: a container reads" \
    "$CONFIG_DIR only if built with --build-arg GID=$HAVE_GID (docs/deploy.md)"
fi
if ! getent passwd shopfloor >/dev/null; then
  say "creating system user shopfloor"
  useradd --system --gid shopfloor --home-dir /var/lib/shopfloor --no-create-home \
    --shell /usr/sbin/nologin --comment "Shopfloor Gateway" shopfloor
fi

# systemd's StateDirectory= would create it at the first start; made now, `shopfloor check`
# run as the gateway's user finds the state dir it will write to.
install -d -m 0750 -o shopfloor -g shopfloor /var/lib/shopfloor

say "installing the gateway into $PREFIX"
if [ ! -x "$PREFIX/bin/python" ]; then
  python3 -m venv "$PREFIX"
fi
"$PREFIX/bin/python" -m pip install -q --upgrade pip
"$PREFIX/bin/python" -m pip install -q "$SRC$EXTRAS"
mkdir -p "$PREFIX/share/shopfloor"
cp -r "$SRC/deploy" "$PREFIX/share/shopfloor/"
[ -d "$SRC/docs" ] && cp -r "$SRC/docs" "$PREFIX/"

say "config in $CONFIG_DIR"
install -d -m 0750 -o root -g shopfloor "$CONFIG_DIR" "$CONFIG_DIR/certs"
if [ ! -f "$CONFIG_DIR/gateway.yaml" ]; then
  install -m 0640 -o root -g shopfloor "$SRC/deploy/config/gateway.yaml" "$CONFIG_DIR/gateway.yaml"
  echo "    wrote $CONFIG_DIR/gateway.yaml: edit it (machines, broker), then check it:"
  echo "    sudo -u shopfloor $PREFIX/bin/shopfloor check -c $CONFIG_DIR/gateway.yaml"
fi
if [ ! -f "$CONFIG_DIR/gateway.env" ]; then
  install -m 0640 -o root -g shopfloor /dev/null "$CONFIG_DIR/gateway.env"
  cat >"$CONFIG_DIR/gateway.env" <<'ENV'
# Secrets for ${VAR} references in gateway.yaml (KEY=value, one per line).
MQTT_USERNAME=
MQTT_PASSWORD=
INFLUX_TOKEN=
ENV
fi

if [ "$SYSTEMD" = yes ]; then
  say "systemd unit"
  sed "s#/opt/shopfloor/#$PREFIX/#g; s#/etc/shopfloor/#$CONFIG_DIR/#g" \
    "$SRC/deploy/systemd/shopfloor.service" >/etc/systemd/system/shopfloor.service
  chmod 0644 /etc/systemd/system/shopfloor.service
  systemctl daemon-reload
  systemctl enable shopfloor.service >/dev/null
  if [ "$START" = yes ]; then
    systemctl restart shopfloor.service
    systemctl --no-pager status shopfloor.service || true
  else
    echo "    enabled; start it with: systemctl start shopfloor"
  fi
fi
say "done: $("$PREFIX/bin/shopfloor" --version)"
