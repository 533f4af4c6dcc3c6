"""Load an exported model with transformers alone and report what it computes (tests/test_hf_export.py).

Run in a fresh process outside the repository: everything must come from the export directory.

    python hf_generate.py EXPORT_DIR TOKENS_JSON TEXT RESULT_JSON
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = 40  # 2.5 segments of the test's tiny model
NEW_TOKENS = 30


def greedy(model, prompt):
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()


def main(path, tokens_json, text, result_path):
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tokens = torch.tensor(json.loads(tokens_json))
    prompt = tokens[:1, :PROMPT]
    with torch.no_grad():
        logits = model(tokens).logits
        first, second = greedy(model, prompt), greedy(model, prompt)
        # Greedy decoding by hand, re-reading the whole document (from an empty memory) every step.
        manual = prompt
        while manual.shape[1] < len(first):
            next_token = model(manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, next_token], dim=1)
        # The first part of the prompt read in an earlier call, kept in memory.
        model.keep_memory(True)
        model(prompt[:, :25])
        continued = prompt[0, :25].tolist() + greedy(model, prompt[:, 25:])
        model.keep_memory(False)
    ids = tokenizer(text)["input_ids"]
    result = {
        "project_imported": any(name.split(".")[0] == "megatron_memorizing" for name in sys.modules),
        "logits": logits.tolist(),
        "first": first,
        "second": second,
        "manual": manual[0].tolist(),
        "continued": continued,
        "ids": ids,
        "decoded": tokenizer.decode(ids),
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
