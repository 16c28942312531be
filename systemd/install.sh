#!/usr/bin/env bash
# Installs kms as a systemd service: builds the release binaries (under sudo, as the
# user who ran it) and installs kmsd, kmsctl and kms-tui with the units, the kms account
# (sysusers.d) and /run/kms (tmpfiles.d). See docs/service.md.
#
#   sudo systemd/install.sh            system service: /usr/local/bin, /etc/systemd/system
#   systemd/install.sh --user          user service:   ~/.local/bin, ~/.config/systemd/user
#
# Options:
#   --dry-run        print every step, change nothing
#   --prefix DIR     install under DIR (a staging root, as DESTDIR); skips systemctl
#   --binaries DIR   take kmsd, kmsctl and kms-tui from DIR instead of building them
#
# It never touches a store or a root key: upgrading is running it again, then
# `systemctl restart kmsd`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
dry_run=0
user=0
prefix=""
binaries=""

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --user) user=1 ;;
    --prefix) prefix="${2:?--prefix needs a directory}"; shift ;;
    --prefix=*) prefix="${1#--prefix=}" ;;
    --binaries) binaries="${2:?--binaries needs a directory}"; shift ;;
    --binaries=*) binaries="${1#--binaries=}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

# Shows a step, and runs it unless --dry-run.
step() {
  printf '+ %s\n' "$*"
  if ((dry_run == 0)); then "$@"; fi
}

if ((user)); then
  bindir="${HOME:?}/.local/bin"
  unitdir="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
  docdir="${XDG_DATA_HOME:-$HOME/.local/share}/doc/kms"
  units=("$here/user/kmsd.service" "$here/user/kmsd.socket")
else
  bindir=/usr/local/bin
  unitdir=/etc/systemd/system
  docdir=/usr/local/share/doc/kms
  units=("$here/kmsd.service" "$here/kmsd.socket")
  if ((dry_run == 0)) && [[ -z "$prefix" ]] && ((EUID != 0)); then
    echo "install.sh: the system service needs root (or use --user, --prefix, --dry-run)" >&2
    exit 1
  fi
fi

# A kmsd that systemd did not start (kmsctl and kms-tui start one when none answers)
# holding the store the service would use: the service could not take the store's lock
# and would restart until systemd gives up, while systemd's socket replaced the one that
# daemon listens on. Checked in a dry run too; never with --prefix (a staging root).
if [[ -z "$prefix" ]]; then
  if ((user)); then
    data_dir="${XDG_DATA_HOME:-$HOME/.local/share}/kms"
    systemctl_=(systemctl --user)
  else
    data_dir=/var/lib/kms
    systemctl_=(systemctl)
  fi
  state="$("${systemctl_[@]}" is-active kmsd.service 2>/dev/null || true)"
  sub="$("${systemctl_[@]}" show -P SubState kmsd.service 2>/dev/null || true)"
  # The service's own kmsd (running, starting, stopping) is the upgrade case; not one
  # waiting to be restarted (`activating`, sub-state `auto-restart`), which is what a
  # kmsd holding the lock makes of it. Otherwise the lock is probed (for an instant).
  case "$state" in
    active | activating | deactivating | reloading | refreshing) managed=1 ;;
    *) managed=0 ;;
  esac
  [[ "$sub" == auto-restart ]] && managed=0
  if ((managed == 0)) && command -v flock >/dev/null && [[ -e "$data_dir/kmsd.lock" ]] \
    && ! flock --nonblock --exclusive "$data_dir/kmsd.lock" true 2>/dev/null; then
    echo "install.sh: a kmsd that systemd did not start is serving $data_dir (kmsctl or" \
      "kms-tui started it); stop it first (pkill -TERM -x kmsd, as its owner), then run this again" >&2
    exit 1
  fi
fi

if [[ -z "$binaries" ]]; then
  build=(cargo build --release --locked --manifest-path "$repo/Cargo.toml" -p kmsd -p kms-tui)
  target_dir="${CARGO_TARGET_DIR:-$repo/target}"
  if ((EUID == 0)) && [[ -n "${SUDO_USER:-}" && "$SUDO_USER" != root ]]; then
    # Built as whoever ran sudo: sudo's PATH has no ~/.cargo/bin (rustup's), and a build
    # as root would leave root-owned files in their target directory. Their login
    # environment may name another target directory: the binaries are taken from it.
    as_user=(sudo -u "$SUDO_USER" -H bash -lc)
    build=("${as_user[@]}" "$(printf '%q ' "${build[@]}")")
  fi
  if ! step "${build[@]}"; then
    echo "install.sh: the build failed; build as yourself (cargo build --release -p kmsd" \
      "-p kms-tui), then run: sudo systemd/install.sh --binaries target/release" >&2
    exit 1
  fi
  if ((dry_run == 0)); then
    # Where cargo put them, as whoever built sees it (CARGO_TARGET_DIR in a login
    # profile, build.target-dir in a cargo config). The JSON is the last line: a profile
    # may print before it.
    metadata=(cargo metadata --format-version 1 --no-deps --manifest-path "$repo/Cargo.toml")
    if [[ -n "${as_user:-}" ]]; then
      metadata=("${as_user[@]}" "$(printf '%q ' "${metadata[@]}")")
    fi
    built_in="$("${metadata[@]}" 2>/dev/null | tail -n 1 \
      | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4 || true)"
    target_dir="${built_in:-$target_dir}"
  fi
  binaries="$target_dir/release"
fi

step install -d -m 0755 "$prefix$bindir" "$prefix$unitdir" "$prefix$docdir"
for b in kmsd kmsctl kms-tui; do
  step install -m 0755 "$binaries/$b" "$prefix$bindir/$b"
done
for u in "${units[@]}"; do
  name="$(basename "$u")"
  if [[ "$bindir" == /usr/local/bin && "$docdir" == /usr/local/share/doc/kms ]]; then
    step install -m 0644 "$u" "$prefix$unitdir/$name"
  else
    # The units name /usr/local/bin/kmsd and /usr/local/share/doc/kms (Documentation=);
    # point them at where kmsd and service.md were installed.
    edits="s|/usr/local/bin/kmsd|$bindir/kmsd|;s|/usr/local/share/doc/kms/|$docdir/|"
    printf '+ sed %s %s > %s\n' "$edits" "$u" "$prefix$unitdir/$name"
    if ((dry_run == 0)); then
      sed "$edits" "$u" >"$prefix$unitdir/$name"
      chmod 0644 "$prefix$unitdir/$name"
    fi
  fi
done
if [[ -f "$repo/docs/service.md" ]]; then
  step install -m 0644 "$repo/docs/service.md" "$prefix$docdir/service.md"
fi
if ((user == 0)); then
  step install -d -m 0755 "$prefix/usr/lib/sysusers.d" "$prefix/usr/lib/tmpfiles.d"
  step install -m 0644 "$here/kms.sysusers" "$prefix/usr/lib/sysusers.d/kms.conf"
  step install -m 0644 "$here/kms.tmpfiles" "$prefix/usr/lib/tmpfiles.d/kms.conf"
fi

# Only a running systemd can take the new account, directory and units now.
if [[ -z "$prefix" && -d /run/systemd/system ]]; then
  if ((user)); then
    step systemctl --user daemon-reload
    next="systemctl --user enable --now kmsd.socket"
  else
    step systemd-sysusers /usr/lib/sysusers.d/kms.conf
    step systemd-tmpfiles --create /usr/lib/tmpfiles.d/kms.conf
    step systemctl daemon-reload
    next="systemctl enable --now kmsd.socket"
  fi
  echo "installed; start it with: $next"
elif [[ -n "$prefix" ]]; then
  echo "installed under $prefix (systemctl not run)"
else
  echo "installed; systemd is not running here, so nothing was enabled"
fi
((dry_run == 0)) || echo "(dry run: nothing was changed)"
