"""The base model as both scripts load and measure it: the compute dtype, the 4-bit set-up (BitsAndBytesConfig), the
4-bit base model (from_pretrained), its held-out loss and its answer to a question. finetune.py trains on exactly
this model; merge_and_push.py loads it again to merge into and to check the merge against."""

import bitsandbytes as bnb
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import data
from common import under_fsdp

# The values finetune.py offers for the settings that load the base model. merge_and_push.py takes a recorded value
# only from these: training_info.json is input, and an attention implementation can name a kernel from the Hub
PRECISIONS = ["auto", "bf16", "fp16", "fp32"]
QUANT_TYPES = ["nf4", "fp4"]
ATTENTION = ["sdpa", "flex_attention", "eager"]


# Step 8. The compute dtype the tutorial tells the user to pick by hand, and the 4-bit set-up
def pick_precision(precision):
    """Returns (4-bit compute dtype, trainer bf16 flag)."""
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "fp32" if not on_gpu else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16":
        return torch.bfloat16, True
    # fp16 keeps the tutorial's recipe: fp16 compute in the 4-bit layers, no mixed precision. (trl stores the LoRA
    # weights of a 4-bit model in bf16 whatever this says.)
    return (torch.float16 if precision == "fp16" else torch.float32), False


def make_bnb_config(settings, compute_dtype):
    return BitsAndBytesConfig(
        load_in_4bit=settings.use_4bit,
        bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=settings.use_nested_quant,
        # FSDP shards floating-point tensors only: stored as the compute dtype, the packed 4-bit weights shard across
        # the GPUs like the rest of the model (uint8, bitsandbytes' default, would stay whole on every GPU)
        bnb_4bit_quant_storage=compute_dtype if under_fsdp() else torch.uint8,
    )


# Step 9. Load the base model in 4 bits
def load_base_model(settings, bnb_config, device_map):
    model = AutoModelForCausalLM.from_pretrained(
        settings.model_name,
        quantization_config=bnb_config,
        device_map=device_map,
        # The weights that stay unquantized (embeddings, norms, lm_head) in the compute dtype too. In the checkpoint's
        # own dtype (fp16 for Llama-2) under bf16 training, every layer's activations would flip between fp16 and
        # bf16, and each cast is another copy kept for the backward pass. FSDP needs it as well: it flattens each
        # wrapped block into one tensor of one dtype, the 4-bit weights' storage dtype, which is the compute dtype
        dtype=bnb_config.bnb_4bit_compute_dtype,
        trust_remote_code=settings.trust_remote_code,
        use_safetensors=True,
        attn_implementation=settings.attn_implementation,
    )
    model.config.use_cache = False  # the cache is useless while training and conflicts with gradient checkpointing
    keep_4bit_weights_as_loaded(model)
    return model


def keep_4bit_weights_as_loaded(model):
    """On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks a Linear4bit's weights in place on its first eval-mode
    forward (its absmax turned to bf16 and transposed); the next state_dict() (every checkpoint, the adapter's save)
    unpacks the weights but leaves absmax transposed, so from then on the layer computes with scrambled scales (in
    issue 13 a run's loss jumped from 2.34 to 15.8 after an eval and a checkpoint). With the repacking off, an
    eval-mode forward runs the same dequantize-and-matmul as training. The switch only acts on CPU inputs."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


# What a model is measured by: the held-out loss, and its answer to a question
def count_loss_tokens(rows):
    """The tokens that carry loss in (ids, labels) rows: the model predicts each label from the tokens before it."""
    return sum(sum(label != -100 for label in labels[1:]) for _, labels in rows)


def heldout_loss(model, rows):
    """Mean cross-entropy per loss-carrying token over (ids, labels) rows (data.loss_rows), one row at a time, so no
    padding enters: the trainer's eval loss for rows that fit one batch, and the same number in every script."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            n = count_loss_tokens([(ids, labels)])
            loss = model(input_ids=torch.tensor([ids], device=model.device),
                         labels=torch.tensor([labels], device=model.device)).loss  # fmt: skip
            total, tokens = total + loss.item() * n, tokens + n
    return total / tokens


def sample_answer(model, tokenizer, question, max_new_tokens):
    # Rendered with the chat template the training rows were: the same tokens as a training prompt
    inputs = data.prompt_inputs(tokenizer, question).to(model.device)
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
