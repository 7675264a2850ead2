#!/usr/bin/env bash
# recipes/chat-code-math.yaml from nothing to its answers beside each of its bases' answers: the
# recipe header's three steps on local copies of GSM8K train and MBPP, then `compose compare`
# of the built mixture against each base alone (bfloat16, as the mixture runs them) on
# gsm8k-dev (the 500 training problems GSM8K's recipes hold out; the configuration was chosen on
# the first 192 of them), mbpp-test (500) and humaneval-chat (164).
#
#     bash bench/chat_code_math.sh [DATA]      # DATA: a folder with gsm8k/train.jsonl and
#                                              # mbpp/mbpp.jsonl (default: ../shared/data)
#
# Every step resumes: an answer file is made once (an interrupted `compose answer` continues
# from its .partial file), the build continues from its last checkpoint (`--resume`), and
# compare reuses each side's finished items from its cache, so the mixture answers each suite
# once for the three comparisons. Each step's output, wall time and peak memory go to
# runs/chat-code-math-bench/STEP.log. Base by base, the 1.5B (the best) first, the reports go to
# runs/chat-code-math-vs-BASE-gsm8k/ (and gsm8k-dev's last 308 items alone, no setting was chosen
# on them, to ...-vs-BASE-unchosen/), then runs/chat-code-math-vs-BASE-code/ (humaneval-chat,
# mbpp-test); after the 1.5B's, a few chat answers beside its own to
# runs/chat-code-math-bench/chat.md.
# Batch size: BATCH (default 96: on 2 cores a decoding step of 96 rows costs little more than
# one of 16, docs/performance.md; peak RSS of the math answers at 96: ~5.3 GB).
set -euo pipefail

data=${1:-../shared/data}
gsm8k=$data/gsm8k/train.jsonl
mbpp=$data/mbpp/mbpp.jsonl
batch=${BATCH:-96}
logs=runs/chat-code-math-bench
for file in "$gsm8k" "$mbpp"; do
    [[ -f $file ]] || { echo "error: $file not found (give the data folder)" >&2; exit 1; }
done
mkdir -p "$logs"

step() {  # step NAME COMMAND...: run COMMAND, its output, time and peak memory in NAME.log
    local name=$1
    shift
    echo "$(date -u +%FT%TZ) $name: $*"
    /usr/bin/time -f "$name: %e s wall, %M KB peak RSS" -a -o "$logs/$name.log" \
        "$@" >>"$logs/$name.log" 2>&1
    tail -n 1 "$logs/$name.log"
}

if [[ ! -f runs/chat-code-math-math.jsonl ]]; then
    step answer-math compose answer recipes/gsm8k-carry-on.yaml train.data.size=500 \
        "train.data.dataset=$gsm8k" --retry 4 --temperature 0.7 --max-new-tokens 400 \
        --batch "$batch" --out runs/chat-code-math-math.jsonl
fi
if [[ ! -f runs/chat-code-math-code.jsonl ]]; then
    step answer-code compose answer recipes/gsm8k-carry-on.yaml "train.data.dataset=$mbpp" \
        "train.data.split=train[600:]" train.data.size=null \
        "train.data.fields={question: text, answer: code, tests: test_list, setup: test_setup_code}" \
        --retry 4 --temperature 0.7 --batch "$batch" --out runs/chat-code-math-code.jsonl
fi
if [[ ! -f runs/chat-code-math/carry_on.safetensors ]]; then
    step build compose build recipes/chat-code-math.yaml --resume
fi
# a few chat answers beside the anchor's (prompts fixed before any answer was seen; none is in
# the training data)
prompts=(
    "What should I pack for a two-day hiking trip in autumn?"
    "Explain to a beginner what a hash table is, in a few sentences."
    "Write a short, friendly reply declining an invitation to a meeting on Friday."
    "My tomato plants have yellow leaves at the bottom. What could be wrong?"
)
chat() {  # the prompts, answered by the mixture and by its anchor alone, into chat.md
    if [[ ! -f $logs/chat.md ]]; then
        for prompt in "${prompts[@]}"; do
            echo "### $prompt"
            for model in runs/chat-code-math qwen2.5-coder-1.5b-instruct:bfloat16; do
                printf '\n%s:\n\n' "$model"
                compose generate "$model" --prompt "$prompt" --max-new-tokens 160 2>>"$logs/chat.log"
                echo
            done
        done >"$logs/chat.md.partial"
        mv "$logs/chat.md.partial" "$logs/chat.md"
    fi
}
# the best base first, and on it GSM8K first (the headline): a run cut short has its deciding
# figures before the others
for base in qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct smollm2-135m-instruct; do
    step "compare-$base-gsm8k" compose compare runs/chat-code-math "$base:bfloat16" \
        --suite gsm8k-dev --data "gsm8k=$gsm8k" --batch "$batch" \
        --out "runs/chat-code-math-vs-$base-gsm8k"
    # gsm8k-dev's items no setting was chosen on (from the cache)
    step "compare-$base-unchosen" compose compare runs/chat-code-math "$base:bfloat16" \
        --suite gsm8k-dev --skip 192 --data "gsm8k=$gsm8k" --batch "$batch" \
        --out "runs/chat-code-math-vs-$base-unchosen"
    step "compare-$base-code" compose compare runs/chat-code-math "$base:bfloat16" \
        --suite humaneval-chat --suite mbpp-test --data "mbpp=$mbpp" --batch "$batch" \
        --out "runs/chat-code-math-vs-$base-code"
    [[ $base != qwen2.5-coder-1.5b-instruct ]] || chat
done
