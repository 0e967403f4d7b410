# kgpu run wrapper: sh -c RUNNER kgpu-run RUN_DIR ARGV...
# Runs ARGV, records pid, output and exit code under RUN_DIR, and outlives whoever
# started it. A TERM to the process group reaches the command and the exit code is
# still written. POSIX sh only: it runs inside any pod image.
dir="$1"; shift
mkdir -p "$dir" || exit 97
child=
term=
# The TERM reaches the whole process group, the command included: only note it here,
# and pass it on if it came before the command was started.
trap 'term=1' TERM
echo "$$" > "$dir/runner_pid"
date +%s.%N > "$dir/started_at"
"$@" > "$dir/stdout" 2> "$dir/stderr" < /dev/null &
child=$!
[ -n "$term" ] && kill -TERM "$child" 2>/dev/null
echo "$child" > "$dir/pid.tmp" && mv "$dir/pid.tmp" "$dir/pid"
while :; do
  wait "$child"
  code=$?
  kill -0 "$child" 2>/dev/null || break
done
date +%s.%N > "$dir/completed_at"
echo "$code" > "$dir/exit_code.tmp" && mv "$dir/exit_code.tmp" "$dir/exit_code"
