"""Fine-tune a chat LLM with QLoRA: a 4-bit NF4 base model plus a LoRA adapter, trained on your data set.

Steps 1-10 of the tutorial, top to bottom. Every setting below can be edited here or overridden on the command line:

    python finetune.py                                      # the tutorial's run: Llama-2-7b-chat on guanaco-llama2-1k
    python finetune.py --dataset_name my_rows.jsonl         # your own rows: .jsonl, .json, .csv or .parquet, "text" column
    python finetune.py --max_steps 20 --model_name ./my-model
    python finetune.py --help                               # every setting with its default

The adapter and tokenizer land in --new_model; `python merge_and_push.py` then merges and publishes them.
"""

# Step 1. Imports
import os
from dataclasses import dataclass

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from common import (
    ModelSettings,
    UserError,
    device_map_for,
    load_config,
    load_tokenizer,
    parse_settings,
    run_cli,
    setting,
)

LOCAL_DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Settings(ModelSettings):
    # Step 2. The data set (the base model and the new model's name are in common.ModelSettings)
    dataset_name: str = setting(
        "mlabonne/guanaco-llama2-1k", "Hub data set id, or a local .jsonl/.json/.csv/.parquet file with a 'text' column"
    )

    # Step 3. LoRA
    lora_r: int = setting(64, "rank of the LoRA update matrices: larger learns more and costs more memory")
    lora_alpha: int = setting(16, "LoRA scaling: the update is multiplied by lora_alpha / lora_r")
    lora_dropout: float = setting(0.1, "dropout on the LoRA layers' input")
    lora_target_modules: str = setting(
        "", "layers that get LoRA: comma-separated names, 'all-linear', or empty for peft's default (q_proj,v_proj on Llama)"
    )

    # Step 4. bitsandbytes
    use_4bit: bool = setting(True, "load the base model quantized to 4 bits (QLoRA)")
    bnb_4bit_quant_type: str = setting("nf4", "4-bit data type", choices=["nf4", "fp4"])
    use_nested_quant: bool = setting(False, "double quantization: quantize the quantization constants too")
    precision: str = setting(
        "auto",
        "compute dtype of the 4-bit layers and the trainer's mixed precision. auto: bf16 on a GPU of compute "
        "capability >= 8 (the tutorial's step 8 advice, applied), fp16 on older GPUs, fp32 on the CPU",
        choices=["auto", "bf16", "fp16", "fp32"],
    )

    # Step 5. TrainingArguments
    output_dir: str = setting("./results", "checkpoints and tensorboard logs")
    num_train_epochs: float = setting(1, "passes over the training data")
    per_device_train_batch_size: int = setting(1, "rows per GPU per step")
    gradient_accumulation_steps: int = setting(1, "steps whose gradients are added up before one optimizer update")
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward pass: less memory, slower")
    max_grad_norm: float = setting(0.3, "gradient clipping")
    learning_rate: float = setting(2e-4, "initial AdamW learning rate (the tutorial's text says 2e-6: see README)")
    weight_decay: float = setting(0.001, "weight decay on all weights but biases and norms")
    optim: str = setting("paged_adamw_32bit", "optimizer (any name transformers' TrainingArguments takes)")
    lr_scheduler_type: str = setting("cosine", "learning-rate schedule")
    max_steps: int = setting(-1, "stop after this many steps; -1 runs num_train_epochs")
    warmup_ratio: float = setting(0.03, "fraction of the steps spent warming the learning rate up from 0")
    group_by_length: bool = setting(True, "batch rows of similar length together: less padding")
    save_steps: int = setting(0, "save a checkpoint every N steps; 0 saves none (the tutorial)")
    logging_steps: int = setting(25, "log the loss every N steps")
    report_to: str = setting("tensorboard", "where logs go: tensorboard, none, wandb, ...")
    checkpoint_every_n_layers: int = setting(
        1, "with gradient_checkpointing: recompute only every n-th layer (more memory, faster)"
    )
    activation_offloading: bool = setting(False, "with gradient_checkpointing: keep saved activations in CPU memory")
    use_liger_kernel: bool = setting(False, "Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, cross-entropy)")
    torch_compile: bool = setting(False, "compile the model with torch.compile")

    # Step 6. SFT
    max_length: int = setting(1024, "longest row in tokens; longer rows are cut")
    packing: bool = setting(False, "pack several short rows into one sequence")
    padding_free: bool = setting(False, "batch rows end to end with no padding (packing implies it)")
    attn_implementation: str = setting(
        "sdpa", "attention kernel; flex_attention keeps packed rows apart on the GPU", choices=["sdpa", "flex_attention", "eager"]
    )

    # After training: the answer printed to check the adapter
    sample_prompt: str = setting("What is a large language model?", "question answered after training")
    sample_max_new_tokens: int = setting(200, "length budget of that answer; 0 skips it")


# Step 7. Load the data set
def load_rows(dataset_name):
    extension = os.path.splitext(dataset_name)[1].lower()
    if extension in LOCAL_DATA_FORMATS:
        if not os.path.isfile(dataset_name):
            raise UserError(f"data set file '{dataset_name}' not found: check --dataset_name")
        dataset = load_dataset(LOCAL_DATA_FORMATS[extension], data_files=dataset_name, split="train")
    else:
        dataset = load_dataset(dataset_name, split="train")
    if "text" not in dataset.column_names:
        raise UserError(
            f"data set '{dataset_name}' has no 'text' column (its columns: {', '.join(dataset.column_names)}): "
            "give each row its whole formatted conversation in a column named 'text'"
        )
    return dataset


# Step 8. Check the GPU: pick the compute dtype the tutorial tells the user to pick by hand
def pick_precision(precision):
    """Returns (4-bit compute dtype, trainer bf16 flag)."""
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "fp32" if not on_gpu else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16":
        return torch.bfloat16, True
    # fp16 keeps the tutorial's recipe: fp16 compute in the 4-bit layers, fp32 LoRA weights, no mixed precision
    return (torch.float16 if precision == "fp16" else torch.float32), False


def make_bnb_config(settings, compute_dtype):
    return BitsAndBytesConfig(
        load_in_4bit=settings.use_4bit,
        bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=settings.use_nested_quant,
    )


# Step 9. Load the base model and tokenizer, set up LoRA and the trainer
def load_base_model(settings, bnb_config, device_map):
    model = AutoModelForCausalLM.from_pretrained(
        settings.model_name,
        quantization_config=bnb_config,
        device_map=device_map,
        trust_remote_code=settings.trust_remote_code,
        use_safetensors=True,
        attn_implementation=settings.attn_implementation,
    )
    model.config.use_cache = False  # the cache is useless while training and conflicts with gradient checkpointing
    return model


def make_lora_config(settings):
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=parse_target_modules(settings.lora_target_modules),
    )


def parse_target_modules(names):
    if not names:
        return None  # peft picks the architecture's default
    return names if names == "all-linear" else [name.strip() for name in names.split(",")]


def make_training_config(settings, bf16):
    return SFTConfig(
        output_dir=settings.output_dir,
        num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        activation_checkpointing=settings.gradient_checkpointing,  # transformers 5's name for it
        activation_checkpointing_kwargs={
            "every_n_layers": settings.checkpoint_every_n_layers,
            "offload": settings.activation_offloading,
        },
        use_liger_kernel=settings.use_liger_kernel,
        torch_compile=settings.torch_compile,
        max_grad_norm=settings.max_grad_norm,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        optim=settings.optim,
        lr_scheduler_type=settings.lr_scheduler_type,
        max_steps=settings.max_steps,
        warmup_steps=settings.warmup_ratio,  # a value below 1 is a fraction of the run, as warmup_ratio was
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        save_strategy="steps" if settings.save_steps > 0 else "no",
        save_steps=settings.save_steps if settings.save_steps > 0 else 500,
        logging_steps=settings.logging_steps,
        report_to=settings.report_to,
        bf16=bf16,
        fp16=False,
        max_length=settings.max_length,
        packing=settings.packing,
        padding_free=settings.padding_free,
        dataset_text_field="text",
    )


# Step 10. Train and save the adapter, then let it answer one question
def llama2_prompt(question):
    """A user turn in the format of the tutorial's rows: `<s>[INST] question [/INST]`."""
    return f"<s>[INST] {question} [/INST]"


def sample_answer(model, tokenizer, question, max_new_tokens):
    # The prompt holds its own <s>: the tokenizer must not add a second one
    inputs = tokenizer(llama2_prompt(question), return_tensors="pt", add_special_tokens=False).to(model.device)
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv=None, callbacks=()):
    """Runs steps 1-10; `callbacks` (TrainerCallback objects) let the benchmark time the steps."""
    settings = parse_settings(Settings, argv)
    config = load_config(settings.model_name, settings.trust_remote_code)
    device_map = device_map_for(settings.model_name, config)
    dataset = load_rows(settings.dataset_name)

    compute_dtype, bf16 = pick_precision(settings.precision)
    bnb_config = make_bnb_config(settings, compute_dtype)
    print(f"4-bit compute dtype: {compute_dtype}, trainer bf16: {bf16}, device: {device_map['']}")

    model = load_base_model(settings, bnb_config, device_map)
    tokenizer = load_tokenizer(settings.model_name, settings.trust_remote_code)
    trainer = SFTTrainer(
        model=model,
        args=make_training_config(settings, bf16),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=make_lora_config(settings),
        callbacks=list(callbacks),
    )

    trainer.train()
    trainer.save_model(settings.new_model)  # the adapter (not the base model) and the tokenizer
    print(f"adapter saved to {settings.new_model}")

    if settings.sample_max_new_tokens > 0:
        answer = sample_answer(trainer.model, tokenizer, settings.sample_prompt, settings.sample_max_new_tokens)
        print(f"{settings.sample_prompt}\n>>> {answer}")
    return trainer


if __name__ == "__main__":
    run_cli(main)
