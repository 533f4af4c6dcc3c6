"""Load an exported model with transformers alone and report what it computes (tests/test_hf_export.py).

Run in a fresh process outside the repository: everything must come from the export directory.

    python hf_generate.py EXPORT_DIR TOKENS_JSON TEXT RESULT_JSON [DEVICE]
"""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_outputs import CausalLMOutputWithPast

PROMPT = 40  # 2.5 segments of the test's tiny model
NEW_TOKENS = 30
# generate() hands the model its cache under this name.
CACHE_ARGUMENT = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def greedy(model, prompt, **kwargs):
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)[0].tolist()


def beam_search(model, prompt):
    """The best of 3 beams, and its score as beam search computed it (the generated tokens' summed
    log-probabilities) next to the same sum from re-reading the document."""
    out = model.generate(
        prompt, max_new_tokens=12, num_beams=3, length_penalty=0.0, do_sample=False,
        return_dict_in_generate=True, output_scores=True,
    )
    sequence = out.sequences[:1]
    log_probs = model(sequence, use_cache=False).logits[0, prompt.shape[1] - 1 : -1].log_softmax(-1)
    reread = log_probs.gather(-1, sequence[0, prompt.shape[1] :, None]).sum()
    return out.sequences_scores[0].item(), reread.item()


def main(path, tokens_json, text, result_path, device="cpu"):
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval().to(device)
    tokens = torch.tensor(json.loads(tokens_json), device=device)
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
        # The transformers convention: a memory passed in has read the start of input_ids already.
        # transformers >= 5.24 names the argument `cache` (past_key_values still works there, deprecated).
        passed = {}
        for name in ("past_key_values", "cache") if CACHE_ARGUMENT == "cache" else ("past_key_values",):
            memory = model.new_memory()
            model(prompt[:, :25], **{name: memory})
            passed[name] = greedy(model, prompt, **{name: memory})
        beam_score, beam_reread = beam_search(model, prompt)
    ids = tokenizer(text)["input_ids"]
    result = {
        "project_imported": any(name.split(".")[0] == "megatron_memorizing" for name in sys.modules),
        "device": str(logits.device),
        "logits": logits.cpu().tolist(),
        "first": first,
        "second": second,
        "manual": manual[0].tolist(),
        "continued": continued,
        "passed_memory": passed,
        "transformers": transformers.__version__,
        "beam_score": beam_score,
        "beam_reread": beam_reread,
        "ids": ids,
        "decoded": tokenizer.decode(ids),
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
