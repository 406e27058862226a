#!/usr/bin/env bash
# scripts/tune.sh — check, apply and revert the host tuning wsring needs for N connections.
#
#   scripts/tune.sh --connections N [--check | --apply | --revert] [--root DIR] [--workers W]
#
#   --check    (default) print one line per knob: name, current, needed, status.
#              Exit 1 when any knob is LOW, 0 otherwise. Needs no privileges.
#   --apply    raise every LOW knob: sysctls now (<root>/proc/sys) and persistently
#              (<root>/etc/sysctl.d/61-wsring-tune.conf), limits in
#              <root>/etc/security/limits.d/61-wsring-tune.conf (next login).
#              Takes a backup first (<root>/var/backups/wsring-tune/), never lowers a
#              value, and is idempotent: the first backup is never overwritten.
#   --revert   restore every file the backup holds, byte for byte, delete the files
#              and directories --apply created, then delete the backup.
#   --root DIR fake filesystem root (default /, or env WSRING_TUNE_ROOT): everything is
#              read from and written under DIR, so tests never touch the real host.
#   --workers W number of wsring worker threads = io_uring rings (default: nproc).
#
#   Env WSRING_BIN: the wsring binary that measures memlock on the real root (default:
#   wsring on PATH, else this checkout's target/release or target/debug build; set it
#   empty to decide by kernel version only). Never used with a fake --root.
#
# Formulas (N = --connections; tuning/README.md explains each one):
#   nofile                        >= N + 1024          (listeners, rings, eventfds, logs, stdio)
#   fs.nr_open                    >= nofile            (a hard RLIMIT_NOFILE above it is refused)
#   fs.file-max                   >= nofile * 5/4      (system-wide; leave room for the rest)
#   net.core.somaxconn            >= clamp(N/16, 4096, 65535)   (reconnect storms)
#   net.ipv4.tcp_max_syn_backlog  >= clamp(N/16, 1024, 65535)
#   net.core.netdev_max_backlog   >= clamp(N/64, 1000, 65536)
#   net.ipv4.tcp_mem (pages)      pressure >= N * 4 KiB / page size, max >= 3/2 * that,
#                                 min >= 3/4 * that (one page of buffer per busy socket)
#   memlock                       on the real root, measured by 'wsring check --threads W'
#                                 (W rings set up as the server does, under the current
#                                 limit); otherwise by kernel version: none on 5.12 to 6.13
#                                 (io_uring charges the memory cgroup), else >= W * 1 MiB
#                                 (792 KiB per worker measured on 6.18)
#   memory (MemAvailable)         >= N * 5632 B        (3.6 KiB TCP socket + 0.9 KiB
#                                 multishot recv + 1 KiB wsring hard budget; DESIGN.md)
#   kernel.io_uring_disabled      == 0 (or 1 with the user in kernel.io_uring_group, or root)
#   informational only (never fail, never applied; tuning/sysctl.d/60-wsring.conf sets them):
#   net.ipv4.tcp_rmem / tcp_wmem, net.ipv4.tcp_fin_timeout, net.ipv4.tcp_tw_reuse,
#   net.ipv4.ip_local_port_range, and seccomp (only when --root is /).
#
# Exit codes: 0 all OK (or apply/revert done), 1 a knob is LOW, 2 usage or permission error.
set -euo pipefail

readonly HEADROOM_FDS=1024
# RLIMIT_MEMLOCK budget per worker where the kernel charges io_uring rings to it: 792 KiB
# measured on Linux 6.18 (SQ/CQ rings and SQEs at 4096/32768 entries, buffer ring), rounded
# up to 1 MiB for larger pages. The same as RING_MEMLOCK_BYTES in src/cli/check/mod.rs.
readonly RING_MEMLOCK_BYTES=$((1024 * 1024))
# io_uring charges ring memory to the memory cgroup, not RLIMIT_MEMLOCK, from 5.12 up to
# (not including) 6.14, where its region API charges RLIMIT_MEMLOCK again (as major*1000+minor).
readonly MEMLOCK_UNCHARGED_FROM=5012
readonly MEMLOCK_UNCHARGED_TO=6014
readonly TCP_MEM_BYTES_PER_CONN=4096
readonly KERNEL_TCP_SOCKET_BYTES=3686
readonly IO_URING_RECV_BYTES=922
readonly WSRING_USER_BYTES=1024
readonly PER_CONN_BYTES=$((KERNEL_TCP_SOCKET_BYTES + IO_URING_RECV_BYTES + WSRING_USER_BYTES))
readonly NR_OPEN_MAX=1073741816
readonly RECOMMENDED_RMEM="4096 16384 4194304"
readonly RECOMMENDED_WMEM="4096 16384 4194304"
readonly RECOMMENDED_FIN_TIMEOUT=15
readonly RECOMMENDED_PORT_RANGE="10240 65535"
readonly SYSCTL_FRAGMENT=etc/sysctl.d/61-wsring-tune.conf
readonly LIMITS_FRAGMENT=etc/security/limits.d/61-wsring-tune.conf
readonly BACKUP_REL=var/backups/wsring-tune

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die() {
	printf 'tune.sh: %s\n' "$*" >&2
	exit 2
}

is_uint() {
	[[ $1 =~ ^[0-9]+$ ]]
}

# ---------------------------------------------------------------- arguments
MODE=check
CONNECTIONS=""
ROOT="${WSRING_TUNE_ROOT:-/}"
WORKERS=""
while (($# > 0)); do
	case $1 in
	--connections) (($# >= 2)) || die "--connections needs a value"; CONNECTIONS=$2; shift 2 ;;
	--connections=*) CONNECTIONS=${1#*=}; shift ;;
	--root) (($# >= 2)) || die "--root needs a value"; ROOT=$2; shift 2 ;;
	--root=*) ROOT=${1#*=}; shift ;;
	--workers) (($# >= 2)) || die "--workers needs a value"; WORKERS=$2; shift 2 ;;
	--workers=*) WORKERS=${1#*=}; shift ;;
	--check) MODE=check; shift ;;
	--apply) MODE=apply; shift ;;
	--revert) MODE=revert; shift ;;
	-h | --help) usage; exit 0 ;;
	*) die "unknown argument '$1' (see --help)" ;;
	esac
done

[[ -n $ROOT ]] || die "--root must not be empty"
[[ -d $ROOT ]] || die "root '$ROOT' is not a directory"
# P is the prefix of every path: "" for the real root, else the fake root without a trailing /.
P=${ROOT%/}
while [[ $P == */ ]]; do P=${P%/}; done
REAL_ROOT=0
if [[ -z $P ]]; then REAL_ROOT=1; fi
readonly P REAL_ROOT
readonly BK="$P/$BACKUP_REL"
readonly MANIFEST="$BK/manifest"

if [[ $MODE != revert ]]; then
	[[ -n $CONNECTIONS ]] || die "--connections N is required (see --help)"
	if ! is_uint "$CONNECTIONS" || ((10#$CONNECTIONS == 0)); then
		die "--connections must be a positive integer, not '$CONNECTIONS'"
	fi
	((${#CONNECTIONS} <= 12)) || die "--connections $CONNECTIONS is not a plausible number"
fi
if [[ -z $WORKERS ]]; then
	WORKERS=$(nproc 2>/dev/null || echo 1)
fi
if ! is_uint "$WORKERS" || ((10#$WORKERS == 0)); then
	die "--workers must be a positive integer, not '$WORKERS'"
fi
CONNECTIONS=${CONNECTIONS:+$((10#$CONNECTIONS))}
WORKERS=$((10#$WORKERS))

require_root_user() {
	if ((REAL_ROOT)) && [[ $(id -u) != 0 ]]; then
		die "--$MODE on the real root writes /proc/sys and /etc: run it as root (sudo $0 ...)"
	fi
}

# ---------------------------------------------------------------- helpers
ceil_div() { echo $((($1 + $2 - 1) / $2)); }

clamp() {
	local v=$1 lo=$2 hi=$3
	if ((v < lo)); then v=$lo; fi
	if ((v > hi)); then v=$hi; fi
	echo "$v"
}

max() { if (($1 >= $2)); then echo "$1"; else echo "$2"; fi; }

# "fs.file-max" -> "fs/file-max"
sysctl_rel() { echo "proc/sys/${1//.//}"; }

# Prints the sysctl's value with whitespace squeezed to single spaces; fails if unreadable.
read_sysctl() {
	local path
	path="$P/$(sysctl_rel "$1")"
	[[ -r $path ]] || return 1
	local v
	v=$(tr -s '[:space:]' ' ' <"$path") || return 1
	v=${v# }
	v=${v% }
	[[ -n $v ]] || return 1
	echo "$v"
}

# ge CUR NEED: CUR >= NEED, where CUR may be "unlimited".
ge() {
	if [[ $1 == unlimited ]]; then return 0; fi
	is_uint "$1" || return 1
	(($1 >= $2))
}

# read_limit "Max open files" -> "soft hard" (numbers or "unlimited"), from
# <root>/proc/self/limits (the Linux format) when present, else from ulimit.
# ulimit_flag is the matching ulimit option; memlock from ulimit is KiB, so scale.
read_limit() {
	local name=$1 ulimit_flag=$2 scale=$3 file="$P/proc/self/limits" line rest soft hard
	if [[ -r $file ]]; then
		while IFS= read -r line; do
			if [[ $line == "$name "* ]]; then
				rest=${line#"$name"}
				read -r soft hard _ <<<"$rest"
				echo "$soft $hard"
				return 0
			fi
		done <"$file"
	fi
	soft=$(ulimit -S "$ulimit_flag")
	hard=$(ulimit -H "$ulimit_flag")
	[[ $soft == unlimited ]] || soft=$((soft * scale))
	[[ $hard == unlimited ]] || hard=$((hard * scale))
	echo "$soft $hard"
}

kib() { if [[ $1 == unlimited ]]; then echo unlimited; else echo "$(ceil_div "$1" 1024)KiB"; fi; }

# ---------------------------------------------------------------- needed values
compute_needed() {
	local n=$CONNECTIONS page
	NEED_NOFILE=$((n + HEADROOM_FDS))
	((NEED_NOFILE <= NR_OPEN_MAX)) || die "--connections $n needs nofile $NEED_NOFILE, above the kernel's fs.nr_open maximum $NR_OPEN_MAX"
	NEED_NR_OPEN=$NEED_NOFILE
	NEED_FILE_MAX=$(((NEED_NOFILE * 5 + 3) / 4))
	NEED_SOMAXCONN=$(clamp "$(ceil_div "$n" 16)" 4096 65535)
	NEED_SYN_BACKLOG=$(clamp "$(ceil_div "$n" 16)" 1024 65535)
	NEED_NETDEV_BACKLOG=$(clamp "$(ceil_div "$n" 64)" 1000 65536)
	page=$(getconf PAGESIZE 2>/dev/null || echo 4096)
	is_uint "$page" && ((page > 0)) || page=4096
	PAGE_SIZE=$page
	local pressure
	pressure=$(ceil_div $((n * TCP_MEM_BYTES_PER_CONN)) "$page")
	NEED_TCP_MEM="$(((pressure * 3 + 3) / 4)) $pressure $(((pressure * 3 + 1) / 2))"
	NEED_MEMLOCK=$((WORKERS * RING_MEMLOCK_BYTES))
	NEED_MEMORY_MIB=$(ceil_div $((n * PER_CONN_BYTES)) $((1024 * 1024)))
}

# ---------------------------------------------------------------- the table
ROW_NAME=()
ROW_CUR=()
ROW_NEED=()
ROW_STATUS=()
ROW_NOTE=()
# Values --apply would write, by knob name.
declare -A APPLY_SYSCTL=()
APPLY_NOFILE=0
APPLY_MEMLOCK=0

add_row() {
	ROW_NAME+=("$1")
	ROW_CUR+=("$2")
	ROW_NEED+=("$3")
	ROW_STATUS+=("$4")
	ROW_NOTE+=("$5")
}

# A sysctl that must be at least NEED.
check_min_sysctl() {
	local name=$1 need=$2 why=$3 cur
	if ! cur=$(read_sysctl "$name"); then
		add_row "$name" "?" "$need" INFO "cannot read $P/$(sysctl_rel "$name"): $why"
	elif is_uint "$cur" && ((cur >= need)); then
		add_row "$name" "$cur" "$need" OK ""
	else
		add_row "$name" "$cur" "$need" LOW "$why"
		APPLY_SYSCTL[$name]=$need
	fi
}

# The kernel release: <root>/proc/sys/kernel/osrelease, or uname on the real root.
kernel_release() {
	if read_sysctl kernel.osrelease; then return 0; fi
	if ((REAL_ROOT)); then uname -r; else return 1; fi
}

# charges_memlock RELEASE: true when io_uring on that kernel charges ring memory to
# RLIMIT_MEMLOCK (an unparsable or empty release is assumed to).
charges_memlock() {
	[[ $1 =~ ^([0-9]+)\.([0-9]+) ]] || return 0
	local v=$((10#${BASH_REMATCH[1]} * 1000 + 10#${BASH_REMATCH[2]}))
	((v < MEMLOCK_UNCHARGED_FROM || v >= MEMLOCK_UNCHARGED_TO))
}

# The wsring binary to measure memlock with, if any (see WSRING_BIN in --help).
find_wsring() {
	if [[ -n ${WSRING_BIN+set} ]]; then
		[[ -n $WSRING_BIN && -x $WSRING_BIN ]] || return 1
		echo "$WSRING_BIN"
		return 0
	fi
	local here candidate
	here=$(cd "$(dirname "$0")/.." && pwd)
	for candidate in "$(command -v wsring || true)" "$here/target/release/wsring" "$here/target/debug/wsring"; do
		if [[ -n $candidate && -x $candidate ]]; then
			echo "$candidate"
			return 0
		fi
	done
	return 1
}

# memlock_raise_to SOFT: what --apply raises memlock to when the rings do not fit: the
# budget, or that much above SOFT when SOFT is already above it (other processes of the user
# hold the rest). The same rule as kernel_charges_memlock in src/cli/check/mod.rs.
memlock_raise_to() {
	if [[ $1 != unlimited ]] && (($1 >= NEED_MEMLOCK)); then
		echo $(($1 + NEED_MEMLOCK))
	else
		echo "$NEED_MEMLOCK"
	fi
}

# memlock_row SOFT: the memlock row. On the real root 'wsring check' measures it (it sets up
# the server's rings under this limit); otherwise, or when that gives no memlock line, the
# kernel version decides.
memlock_row() {
	local soft=$1 bin out row cur need status note prefix="" release kernel
	if ((REAL_ROOT)); then
		if bin=$(find_wsring); then
			out=$("$bin" check --connections "$CONNECTIONS" --threads "$WORKERS" 2>/dev/null) || true
			# Fields: name, current, needed (may hold spaces), status.
			row=$(awk '$1 == "memlock" && NF >= 4 { n = $3; for (i = 4; i < NF; i++) n = n " " $i; print $2 "\t" n "\t" $NF; exit }' <<<"$out")
			note=$(awk '/^  memlock \([A-Z]+\): / { sub(/^  memlock \([A-Z]+\): /, ""); print; exit }' <<<"$out")
			if [[ -n $row ]]; then
				IFS=$'\t' read -r cur need status <<<"$row"
				add_row memlock "$cur" "$need" "$status" "${note:+$note; }from $bin check --threads $WORKERS"
				if [[ $status == LOW ]]; then
					APPLY_MEMLOCK=1
					NEED_MEMLOCK=$(memlock_raise_to "$soft")
				fi
				return 0
			fi
			prefix="not measured ($bin check printed no memlock line); "
		else
			prefix="not measured (no wsring binary: build it or set WSRING_BIN); "
		fi
	fi
	if release=$(kernel_release) && [[ -n $release ]]; then
		kernel="kernel $release"
	else
		release=""
		kernel="an unknown kernel (no proc/sys/kernel/osrelease)"
	fi
	if ! charges_memlock "$release"; then
		add_row memlock "$(kib "$soft")" "not charged" OK \
			"${prefix}$kernel charges io_uring rings to the memory cgroup, not RLIMIT_MEMLOCK (5.12 to 6.13)"
		return 0
	fi
	local why="${prefix}$kernel charges io_uring rings to RLIMIT_MEMLOCK (before 5.12, and again from 6.14) unless the process has CAP_IPC_LOCK: $WORKERS worker(s) x 1 MiB (792 KiB measured on 6.18), summed over every process of the user; 'wsring check' on the host measures it"
	if ge "$soft" "$NEED_MEMLOCK"; then
		add_row memlock "$(kib "$soft")" "$(kib "$NEED_MEMLOCK")" OK "${prefix:+$why}"
	else
		add_row memlock "$(kib "$soft")" "$(kib "$NEED_MEMLOCK")" LOW "$why"
		APPLY_MEMLOCK=1
	fi
}

collect() {
	ROW_NAME=()
	ROW_CUR=()
	ROW_NEED=()
	ROW_STATUS=()
	ROW_NOTE=()
	APPLY_SYSCTL=()
	APPLY_NOFILE=0
	APPLY_MEMLOCK=0
	local cur soft hard

	check_min_sysctl fs.file-max "$NEED_FILE_MAX" \
		"system-wide open-file limit; every socket is a struct file even as an io_uring direct descriptor"
	check_min_sysctl fs.nr_open "$NEED_NR_OPEN" \
		"ceiling for any process's RLIMIT_NOFILE; a hard nofile above it cannot be set (PAM logins can fail)"

	# RLIMIT_NOFILE: wsring raises soft to hard at start, so the hard limit decides.
	read -r soft hard <<<"$(read_limit "Max open files" -n 1)"
	if ge "$hard" "$NEED_NOFILE"; then
		if ge "$soft" "$NEED_NOFILE"; then
			add_row nofile "$soft/$hard" "$NEED_NOFILE" OK ""
		else
			add_row nofile "$soft/$hard" "$NEED_NOFILE" OK \
				"soft limit is below: wsring raises soft to hard at start; other tools (ulimit -n) may need it raised"
		fi
	else
		add_row nofile "$soft/$hard" "$NEED_NOFILE" LOW \
			"RLIMIT_NOFILE (soft/hard) caps connections per process (one descriptor each, also the size of a ring's direct-descriptor table)"
		APPLY_NOFILE=1
	fi

	# RLIMIT_MEMLOCK: io_uring checks the soft limit.
	read -r soft hard <<<"$(read_limit "Max locked memory" -l 1024)"
	memlock_row "$soft"

	# Memory for N idle connections.
	cur=""
	if [[ -r $P/proc/meminfo ]]; then
		cur=$(awk '$1 == "MemAvailable:" { print int($2 / 1024) }' "$P/proc/meminfo")
	fi
	if [[ -z $cur ]]; then
		add_row memory "?" "${NEED_MEMORY_MIB}MiB" INFO "cannot read MemAvailable from $P/proc/meminfo"
	elif ((cur >= NEED_MEMORY_MIB)); then
		add_row memory "${cur}MiB" "${NEED_MEMORY_MIB}MiB" OK ""
	else
		add_row memory "${cur}MiB" "${NEED_MEMORY_MIB}MiB" LOW \
			"MemAvailable is below N x $PER_CONN_BYTES B per idle connection (kernel socket + io_uring recv + wsring); add RAM or lower N"
	fi

	check_min_sysctl net.core.somaxconn "$NEED_SOMAXCONN" \
		"caps every listen() backlog; a reconnect storm overflows a short accept queue and clients wait for SYN retries"
	check_min_sysctl net.ipv4.tcp_max_syn_backlog "$NEED_SYN_BACKLOG" \
		"half-open (SYN_RECV) connections kept per listener before SYN cookies take over"
	check_min_sysctl net.core.netdev_max_backlog "$NEED_NETDEV_BACKLOG" \
		"packets queued per CPU between the NIC and TCP; bursts of many small frames drop beyond it"

	# tcp_mem: "min pressure max" in pages; pressure and max decide, each field only raised.
	local -a c n
	read -r -a n <<<"$NEED_TCP_MEM"
	if ! cur=$(read_sysctl net.ipv4.tcp_mem); then
		add_row net.ipv4.tcp_mem "?" "$NEED_TCP_MEM" INFO "cannot read $P/proc/sys/net/ipv4/tcp_mem"
	else
		read -r -a c <<<"$cur"
		if ((${#c[@]} == 3)) && is_uint "${c[0]}" && is_uint "${c[1]}" && is_uint "${c[2]}" &&
			((c[1] >= n[1] && c[2] >= n[2])); then
			add_row net.ipv4.tcp_mem "$cur" "$NEED_TCP_MEM" OK ""
		else
			add_row net.ipv4.tcp_mem "$cur" "$NEED_TCP_MEM" LOW \
				"pages ($PAGE_SIZE B) of socket-buffer memory for all TCP sockets together; past 'pressure' buffers shrink, past 'max' sends and receives fail"
			if ((${#c[@]} == 3)) && is_uint "${c[0]}" && is_uint "${c[1]}" && is_uint "${c[2]}"; then
				APPLY_SYSCTL[net.ipv4.tcp_mem]="$(max "${c[0]}" "${n[0]}") $(max "${c[1]}" "${n[1]}") $(max "${c[2]}" "${n[2]}")"
			else
				APPLY_SYSCTL[net.ipv4.tcp_mem]=$NEED_TCP_MEM
			fi
		fi
	fi

	# Socket buffer defaults: informational; smaller defaults keep busy sockets lean.
	local name rec
	for name in net.ipv4.tcp_rmem net.ipv4.tcp_wmem; do
		rec=$RECOMMENDED_RMEM
		if [[ $name == net.ipv4.tcp_wmem ]]; then rec=$RECOMMENDED_WMEM; fi
		read -r -a n <<<"$rec"
		if ! cur=$(read_sysctl "$name"); then
			add_row "$name" "?" "$rec" INFO "cannot read $P/$(sysctl_rel "$name")"
			continue
		fi
		read -r -a c <<<"$cur"
		if ((${#c[@]} == 3)) && is_uint "${c[1]}" && ((c[1] <= n[1])); then
			add_row "$name" "$cur" "$rec" OK ""
		else
			add_row "$name" "$cur" "$rec" INFO \
				"default (middle) buffer above $((n[1])): each busy socket may hold more kernel memory; tcp_mem still caps the total (not changed by --apply; tuning/sysctl.d/60-wsring.conf sets it)"
		fi
	done

	if cur=$(read_sysctl net.ipv4.tcp_fin_timeout) && is_uint "$cur" && ((cur <= 30)); then
		add_row net.ipv4.tcp_fin_timeout "$cur" "<=30 (${RECOMMENDED_FIN_TIMEOUT})" OK ""
	else
		add_row net.ipv4.tcp_fin_timeout "${cur:-?}" "<=30 (${RECOMMENDED_FIN_TIMEOUT})" INFO \
			"orphaned FIN_WAIT_2 sockets stay this many seconds after wsring closes; lower it under heavy churn (not changed by --apply)"
	fi

	if cur=$(read_sysctl net.ipv4.tcp_tw_reuse) && [[ $cur == 1 ]]; then
		add_row net.ipv4.tcp_tw_reuse "$cur" "1" OK ""
	else
		add_row net.ipv4.tcp_tw_reuse "${cur:-?}" "1" INFO \
			"lets outbound connects reuse TIME_WAIT ports (load tools, upstream proxies); no effect on accepted connections; 2 = loopback only"
	fi

	if cur=$(read_sysctl net.ipv4.ip_local_port_range); then
		read -r -a c <<<"$cur"
		local ports=$((c[1] - c[0] + 1))
		add_row net.ipv4.ip_local_port_range "$cur" "$RECOMMENDED_PORT_RANGE" INFO \
			"server sockets take no ephemeral port; a load tool gets $ports connections per (source IP, server ip:port), so N needs $(ceil_div "$CONNECTIONS" "$ports") source address(es)"
	else
		add_row net.ipv4.ip_local_port_range "?" "$RECOMMENDED_PORT_RANGE" INFO "cannot read; matters only for load tools"
	fi

	# io_uring availability switch (Linux 6.6+): 0 all, 1 root + kernel.io_uring_group, 2 nobody.
	if ! cur=$(read_sysctl kernel.io_uring_disabled); then
		add_row kernel.io_uring_disabled absent 0 OK "no such sysctl (kernel before 6.6): io_uring is on unless compiled out"
	elif [[ $cur == 0 ]]; then
		add_row kernel.io_uring_disabled 0 0 OK ""
	elif [[ $cur == 1 ]]; then
		local group
		group=$(read_sysctl kernel.io_uring_group || echo -1)
		if [[ $(id -u) == 0 ]]; then
			add_row kernel.io_uring_disabled 1 0 OK "1 = root and kernel.io_uring_group ($group) only; this user is root"
		elif [[ $group != -1 ]] && id -G | tr ' ' '\n' | grep -qx -- "$group"; then
			add_row kernel.io_uring_disabled 1 0 OK "1 = root and kernel.io_uring_group only; this user is in group $group"
		else
			add_row kernel.io_uring_disabled 1 0 LOW \
				"1 = only root and kernel.io_uring_group ($group) may create rings; this user may not, wsring falls back to epoll"
			APPLY_SYSCTL[kernel.io_uring_disabled]=0
		fi
	else
		add_row kernel.io_uring_disabled "$cur" 0 LOW \
			"io_uring is disabled for everyone; wsring falls back to epoll (more syscalls per message)"
		APPLY_SYSCTL[kernel.io_uring_disabled]=0
	fi

	# Seccomp: only meaningful for the real process.
	if ((REAL_ROOT)); then
		cur=$(awk '$1 == "Seccomp:" { print $2 }' /proc/self/status 2>/dev/null || true)
		case ${cur:-?} in
		0) add_row seccomp 0 0 OK "" ;;
		1) add_row seccomp 1 0 LOW "strict seccomp: only read/write/exit are allowed; wsring cannot run" ;;
		2) add_row seccomp 2 0 INFO "a seccomp filter is active (container?): it may deny io_uring_setup; 'wsring check' tries a real ring" ;;
		*) add_row seccomp "?" 0 INFO "no Seccomp: line in /proc/self/status" ;;
		esac
	fi
}

print_table() {
	local i low=()
	printf '%-30s %-24s %-24s %s\n' KNOB CURRENT NEEDED STATUS
	for i in "${!ROW_NAME[@]}"; do
		printf '%-30s %-24s %-24s %s\n' "${ROW_NAME[i]}" "${ROW_CUR[i]}" "${ROW_NEED[i]}" "${ROW_STATUS[i]}"
		if [[ ${ROW_STATUS[i]} == LOW ]]; then low+=("${ROW_NAME[i]}"); fi
	done
	local printed=0
	for i in "${!ROW_NAME[@]}"; do
		if [[ -n ${ROW_NOTE[i]} ]]; then
			if ((printed == 0)); then
				echo
				echo "notes:"
				printed=1
			fi
			printf '  %s (%s): %s\n' "${ROW_NAME[i]}" "${ROW_STATUS[i]}" "${ROW_NOTE[i]}"
		fi
	done
	echo
	LOW_COUNT=${#low[@]}
	if ((LOW_COUNT == 0)); then
		echo "result: OK for $CONNECTIONS connections"
	else
		echo "result: LOW for $CONNECTIONS connections: ${low[*]}"
	fi
}

# ---------------------------------------------------------------- backup / write
record() { printf '%s\t%s\n' "$1" "$2" >>"$MANIFEST"; }

# make_dirs REL: creates the missing components of $P/REL, prints each created one (top-down).
make_dirs() {
	local acc="" part
	local -a parts
	IFS=/ read -r -a parts <<<"$1"
	for part in "${parts[@]}"; do
		if [[ -z $part ]]; then continue; fi
		acc=${acc:+$acc/}$part
		if [[ ! -d $P/$acc ]]; then
			mkdir "$P/$acc"
			printf '%s\n' "$acc"
		fi
	done
}

record_created_dirs() {
	local d
	while IFS= read -r d; do
		if [[ -n $d ]]; then record dir "$d"; fi
	done <<<"$1"
}

ensure_backup_dir() {
	if [[ -f $MANIFEST ]]; then return 0; fi
	local created
	created=$(make_dirs "$BACKUP_REL")
	: >"$MANIFEST"
	record_created_dirs "$created"
	echo "backup: $BK"
}

in_manifest() {
	awk -F '\t' -v r="$1" '($1 == "file" || $1 == "absent") && $2 == r { found = 1 } END { exit !found }' "$MANIFEST"
}

# backup_file REL: the first time only, copy $P/REL into the backup (or note that it is absent).
backup_file() {
	local rel=$1
	ensure_backup_dir
	if in_manifest "$rel"; then return 0; fi
	if [[ -e $P/$rel ]]; then
		mkdir -p "$BK/files/$(dirname "$rel")"
		cat "$P/$rel" >"$BK/files/$rel"
		record file "$rel"
	else
		record absent "$rel"
	fi
}

# write_file REL CONTENT: back up, create missing directories (recorded), write in place.
write_file() {
	local rel=$1 content=$2 created
	backup_file "$rel"
	created=$(make_dirs "$(dirname "$rel")")
	record_created_dirs "$created"
	printf '%s' "$content" >"$P/$rel"
}

readonly SYSCTL_ORDER=(fs.file-max fs.nr_open net.core.somaxconn net.ipv4.tcp_max_syn_backlog
	net.core.netdev_max_backlog net.ipv4.tcp_mem kernel.io_uring_disabled)

APPLY_ERRORS=0

apply_sysctls() {
	local name rel raised=0
	for name in "${SYSCTL_ORDER[@]}"; do
		[[ -n ${APPLY_SYSCTL[$name]+set} ]] || continue
		rel=$(sysctl_rel "$name")
		[[ -e $P/$rel ]] || continue
		backup_file "$rel"
		if printf '%s\n' "${APPLY_SYSCTL[$name]}" >"$P/$rel" 2>/dev/null; then
			echo "set $name = ${APPLY_SYSCTL[$name]} (now, in $P/$rel)"
			raised=1
		else
			echo "FAILED to write $P/$rel (read-only /proc/sys, e.g. in a container? set it on the host)" >&2
			APPLY_ERRORS=1
		fi
	done
	((raised)) || return 0

	# Persistent fragment: keep what an earlier --apply wrote, update what was raised now.
	local -A frag=()
	local key line
	if [[ -r $P/$SYSCTL_FRAGMENT ]]; then
		while IFS= read -r line; do
			[[ $line =~ ^[[:space:]]*([a-z0-9_.-]+)[[:space:]]*=[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]] || continue
			frag[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
		done <"$P/$SYSCTL_FRAGMENT"
	fi
	for name in "${!APPLY_SYSCTL[@]}"; do
		frag[$name]=${APPLY_SYSCTL[$name]}
	done
	local content
	content="# Written by wsring scripts/tune.sh --apply (last run: --connections $CONNECTIONS).
# Holds only values the script raised; undo with scripts/tune.sh --revert.
# Why each knob matters: tuning/README.md.
"
	for key in "${SYSCTL_ORDER[@]}"; do
		if [[ -n ${frag[$key]+set} ]]; then content+="$key = ${frag[$key]}"$'\n'; fi
	done
	for key in "${!frag[@]}"; do
		case " ${SYSCTL_ORDER[*]} " in
		*" $key "*) ;;
		*) content+="$key = ${frag[$key]}"$'\n' ;;
		esac
	done
	write_file "$SYSCTL_FRAGMENT" "$content"
	echo "wrote $P/$SYSCTL_FRAGMENT (applied at every boot by systemd-sysctl)"
}

# Value of "<domain> hard <item>" in our limits fragment, or empty.
fragment_limit() {
	[[ -r $P/$LIMITS_FRAGMENT ]] || return 0
	awk -v item="$1" '$1 == "*" && $2 == "hard" && $3 == item { v = $4 } END { if (v != "") print v }' "$P/$LIMITS_FRAGMENT"
}

apply_limits() {
	((APPLY_NOFILE || APPLY_MEMLOCK)) || return 0
	local nofile memlock old content=""
	nofile=$(fragment_limit nofile)
	memlock=$(fragment_limit memlock)
	if ((APPLY_NOFILE)); then
		old=$nofile
		nofile=$NEED_NOFILE
		if [[ -n $old ]] && ge "$old" "$nofile"; then nofile=$old; fi
	fi
	if ((APPLY_MEMLOCK)); then
		old=$memlock
		memlock=$(ceil_div "$NEED_MEMLOCK" 1024)
		if [[ -n $old ]] && ge "$old" "$memlock"; then memlock=$old; fi
	fi
	content="# Written by wsring scripts/tune.sh --apply (last run: --connections $CONNECTIONS).
# Takes effect at the next login (a new PAM session), not in running shells.
# systemd services ignore this file: use LimitNOFILE=/LimitMEMLOCK= (tuning/wsring.service).
# '*' does not match root, hence the root lines. memlock is in KiB.
"
	local domain
	if [[ -n $nofile ]]; then
		for domain in '*' root; do
			content+="$(printf '%-5s %-5s %-8s %s' "$domain" soft nofile "$nofile")"$'\n'
			content+="$(printf '%-5s %-5s %-8s %s' "$domain" hard nofile "$nofile")"$'\n'
		done
	fi
	if [[ -n $memlock ]]; then
		for domain in '*' root; do
			content+="$(printf '%-5s %-5s %-8s %s' "$domain" soft memlock "$memlock")"$'\n'
			content+="$(printf '%-5s %-5s %-8s %s' "$domain" hard memlock "$memlock")"$'\n'
		done
	fi
	if [[ -r $P/$LIMITS_FRAGMENT ]] && [[ $(cat "$P/$LIMITS_FRAGMENT"; echo x) == "${content}x" ]]; then
		echo "limits: $P/$LIMITS_FRAGMENT already holds these values (log in again to get them)"
		return 0
	fi
	write_file "$LIMITS_FRAGMENT" "$content"
	echo "wrote $P/$LIMITS_FRAGMENT: nofile ${nofile:-unchanged}, memlock ${memlock:-unchanged} KiB"
	echo "  -> takes effect at the next login (log out and in again); running shells keep their limits."
	echo "  -> for the systemd service set LimitNOFILE=/LimitMEMLOCK= in the unit instead (tuning/wsring.service)."
}

do_apply() {
	require_root_user
	compute_needed
	collect
	echo "== before --apply"
	print_table
	echo
	echo "== applying"
	local before=0
	if [[ -f $MANIFEST ]]; then before=1; fi
	apply_sysctls
	apply_limits
	if ((${#APPLY_SYSCTL[@]} == 0 && APPLY_NOFILE == 0 && APPLY_MEMLOCK == 0)); then
		echo "nothing to raise: every knob --apply manages is already high enough"
	elif ((before)); then
		echo "backup kept: $BK holds the state from before the first --apply"
	fi
	echo "never lowered: values already above what is needed were left as they are."
	echo "not applied (advisory): tcp_rmem/tcp_wmem, tcp_fin_timeout, tcp_tw_reuse, ip_local_port_range; see tuning/sysctl.d/60-wsring.conf"
	if ((APPLY_ERRORS)); then
		echo "some writes failed (see above)" >&2
		exit 2
	fi
}

do_revert() {
	require_root_user
	if [[ ! -f $MANIFEST ]]; then
		echo "nothing to revert: no backup at $BK"
		return 0
	fi
	local line kind rel errors=0
	local -a dirs=()
	while IFS= read -r line; do
		[[ -n $line ]] || continue
		kind=${line%%$'\t'*}
		rel=${line#*$'\t'}
		case $kind in
		file)
			if cat "$BK/files/$rel" >"$P/$rel"; then
				echo "restored $P/$rel"
			else
				echo "FAILED to restore $P/$rel" >&2
				errors=1
			fi
			;;
		absent)
			if rm -f -- "$P/$rel"; then
				echo "removed $P/$rel"
			else
				errors=1
			fi
			;;
		dir) dirs+=("$rel") ;;
		*) echo "ignoring unknown manifest line: $line" >&2 ;;
		esac
	done <"$MANIFEST"
	if ((errors)); then
		echo "revert incomplete; the backup stays at $BK" >&2
		exit 2
	fi
	rm -rf -- "$BK"
	local i d
	for ((i = ${#dirs[@]} - 1; i >= 0; i--)); do
		d=${dirs[i]}
		if [[ -d $P/$d ]]; then
			rmdir -- "$P/$d" 2>/dev/null || echo "kept $P/$d (not empty)"
		fi
	done
	echo "reverted: every file is as before the first --apply; the backup is deleted."
	echo "limits.d changes leave running sessions at their current limits until the next login."
}

do_check() {
	compute_needed
	collect
	echo "wsring host check: $CONNECTIONS connections, $WORKERS worker(s), root $ROOT"
	print_table
	if ((LOW_COUNT > 0)); then
		echo "fix: sudo $0 --connections $CONNECTIONS --apply   (sysctls at once and at boot; limits at next login)"
		return 1
	fi
	return 0
}

case $MODE in
check) do_check || exit 1 ;;
apply) do_apply ;;
revert) do_revert ;;
esac
