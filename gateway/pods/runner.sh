# kgpu run wrapper: sh -c RUNNER kgpu-run RUN_DIR STDIN TIMEOUT GRACE ARGV...
# Runs ARGV, records pid, output and exit code under RUN_DIR, and outlives whoever
# started it. A TERM to the process group reaches the command and the exit code is
# still written. STDIN 1: this shell's stdin is kept as RUN_DIR/stdin and given to the
# command (else /dev/null). TIMEOUT > 0: after that many seconds RUN_DIR/timed_out is
# written and the process group gets a TERM, then a KILL GRACE seconds later.
# POSIX sh only: it runs inside any pod image.
dir="$1"; stdin="$2"; timeout="$3"; grace="$4"; shift 4
mkdir -p "$dir" || exit 97
child=
term=
# The TERM reaches the whole process group, the command included: only note it here,
# and pass it on if it came before the command was started.
trap 'term=1' TERM
echo "$$" > "$dir/runner_pid"
input=/dev/null
if [ "$stdin" = 1 ]; then
  cat > "$dir/stdin" || exit 96
  input="$dir/stdin"
fi
date +%s.%N > "$dir/started_at"
"$@" > "$dir/stdout" 2> "$dir/stderr" < "$input" &
child=$!
[ -n "$term" ] && kill -TERM "$child" 2>/dev/null
watchdog=
if [ "$timeout" -gt 0 ]; then
  (
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM  # the run ended in time: the runner ends this
    sleep "$timeout" & nap=$!
    wait "$nap"
    trap '' TERM  # its own group's TERM, below, must not end it before the KILL
    kill -0 "$child" 2>/dev/null || exit 0
    : > "$dir/timed_out"
    kill -TERM "-$$" 2>/dev/null
    sleep "$grace"
    kill -0 "$child" 2>/dev/null || exit 0
    date +%s.%N > "$dir/completed_at"
    echo 137 > "$dir/exit_code.tmp" && mv "$dir/exit_code.tmp" "$dir/exit_code"
    kill -KILL "-$$" 2>/dev/null
  ) &
  watchdog=$!
fi
echo "$child" > "$dir/pid.tmp" && mv "$dir/pid.tmp" "$dir/pid"
while :; do
  wait "$child"
  code=$?
  kill -0 "$child" 2>/dev/null || break
done
[ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
date +%s.%N > "$dir/completed_at"
echo "$code" > "$dir/exit_code.tmp" && mv "$dir/exit_code.tmp" "$dir/exit_code"
