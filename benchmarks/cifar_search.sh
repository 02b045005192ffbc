#!/usr/bin/env bash
# The first real search on the child reward (issue 13), and its baselines at the same budget:
# TRPO-LSTM (configs/cifar_cpu.yaml), random search and regularized evolution, one after
# another, each resumed where it stopped; then the top 10 distinct rules of each promoted to
# the "fast" preset at 3 child seeds, and the classics scored on both protocols. Re-running it
# skips what is done.
#
#   nohup bash benchmarks/cifar_search.sh RUNS_ROOT RULES SEED > RUNS_ROOT.log 2>&1 &
#   AGENTS="trpo_lstm evolution" PROMOTE=0 bash benchmarks/cifar_search.sh ...   # some agents, no promotion
#   python benchmarks/cifar_report.py RUNS_ROOT            # the tables and Figure 4 of docs/results.md
#
# Every agent gets its own store, so each agent's child-images are its own (a shared store
# would let a later agent reuse an earlier one's scores). The promotions share one store, so the
# TRPO run's own end-of-run promotion (configs/cifar_cpu.yaml) is switched off here.
set -euo pipefail
ROOT=${1:-runs/cifar}
RULES=${2:-1500}
SEED=${3:-1}
mkdir -p "$ROOT"
# the settings every agent shares: those of configs/cifar_cpu.yaml (flags win over its values)
COMMON=(--task convnet-cifar10 --task-options "{preset: cpu, schedule: halving, hurdle: 0.277}"
        --space full --depth 2 --num-envs 20 --backend process --torch-threads 1 --eval-timeout 900
        --total-rules "$RULES" --seed "$SEED" --no-progress)

AGENTS=(${AGENTS:-trpo_lstm random_search evolution})
PROMOTE=${PROMOTE:-1}   # 0: no promotion and no classics on "fast" (the classics on the search's protocol stay)

stamp() { date -u +%FT%TZ; }

run_agent() {  # NAME SCRIPT_ARGS...: a fresh run, or the resumed one
    local name=$1; shift
    local dir="$ROOT/$name-s$SEED"
    if [[ -f "$dir/log.jsonl" ]] && (( $(wc -l < "$dir/log.jsonl") >= RULES )); then
        echo "$(stamp) $name: done ($(wc -l < "$dir/log.jsonl") rules)"; return
    fi
    echo "$(stamp) $name: start"
    local t0=$SECONDS
    if [[ -f "$dir/config.yaml" ]]; then
        python "$1" --resume "$dir" --total-rules "$RULES"
    else
        python "$@" --run-dir "$dir" --store "$ROOT/$name.sqlite"
    fi
    echo "$(stamp) $name: finished in $((SECONDS - t0)) s this call"
}

for name in "${AGENTS[@]}"; do
    case $name in
        trpo_lstm) run_agent trpo_lstm agents/trpo_lstm.py --config configs/cifar_cpu.yaml "${COMMON[@]}" --promote "{}" ;;
        random_search|evolution) run_agent "$name" "agents/$name.py" "${COMMON[@]}" ;;
        *) echo "error: unknown agent $name in AGENTS (trpo_lstm, random_search, evolution)" >&2; exit 2 ;;
    esac
done

# promotion: the top 10 distinct rules of each agent on "fast" at 3 child seeds, ranked by the
# mean; one store for all promotions (a rule two agents found is trained once per seed)
SEEDS=(0 1 2)
if (( PROMOTE )); then
    for name in "${AGENTS[@]}"; do
        dir="$ROOT/$name-s$SEED"
        if [[ ! -f "$dir/promoted-fast-seeds0-1-2.json" ]]; then
            echo "$(stamp) promote $name"
            nos-gym promote "$dir" --preset fast --top 10 --seeds "${SEEDS[@]}" --backend process \
                --store "$ROOT/promotion.sqlite"
        fi
    done
fi

# the classics, on the search's protocol and on "fast" at the same seeds, in the promotion store
CLASSICS=(sgd momentum adam rmsprop powersign "(1 + sign(g) * sign(m)) * g")  # the last: AddSign
for run in "cpu 0" "fast 0" "fast 1" "fast 2"; do
    read -r preset seed <<< "$run"
    [[ $preset == fast ]] && (( ! PROMOTE )) && continue
    out="$ROOT/classics-$preset-s$seed.json"
    [[ -f "$out" ]] && continue
    opts="{preset: $preset, seed: $seed}"
    [[ $preset == cpu ]] && opts="{preset: cpu, schedule: halving, hurdle: 0.277}"
    echo "$(stamp) classics on $preset, seed $seed"
    nos-gym eval "${CLASSICS[@]}" --task convnet-cifar10 --task-options "$opts" \
        --store "$ROOT/promotion.sqlite" --backend process --json > "$out.tmp"
    mv "$out.tmp" "$out"
done
echo "$(stamp) all done"
