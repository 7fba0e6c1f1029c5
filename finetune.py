"""Fine-tune a chat LLM with QLoRA: a 4-bit NF4 base model plus a LoRA adapter, trained on your data set.

Steps 1-10 of the tutorial, top to bottom. Every setting below can be edited here or overridden on the command line:

    python finetune.py                                      # Llama-2-7b-chat on guanaco-llama2-1k, fast settings for this GPU
    python finetune.py --gpu_recipe tutorial                # the tutorial's settings exactly (about 10 minutes on an H200)
    python finetune.py --dataset_name my_rows.jsonl         # your own rows: .jsonl/.json/.csv/.tsv/.parquet or a folder
    python finetune.py --dataset_name my_rows.jsonl --check_data   # check them first: no model weights are loaded
    python finetune.py --max_steps 20 --model_name ./my-model
    python finetune.py --help                               # every setting with its default
    accelerate launch --multi_gpu --num_processes 2 finetune.py   # on 2 GPUs, data-parallel (FSDP: see README)

The adapter and tokenizer land in --new_model; `python merge_and_push.py` then merges and publishes them.
After a crash or Ctrl-C, rerun the same command: it resumes from the newest checkpoint in --output_dir.

What the steps call lives beside this file: data.py (step 7: the rows, rendered and checked), recipes.py (step 8: the
speed settings that fit this GPU), qlora.py (steps 8-9: the 4-bit base model, loaded the same way by
merge_and_push.py), safeguards.py (the checks before anything loads, resuming, Ctrl-C), common.py (the command line,
the files the two scripts leave each other).
"""


# Step 1. Imports
import os
import sys
from dataclasses import dataclass

import startup

startup.before_the_imports(as_script=__name__ == "__main__")  # Ctrl-C while loading, and the libraries' noise

# Before torch starts CUDA: the allocator grows its memory segments in place instead of reserving new blocks for each
# new size, so little more is reserved than is in use (bench/RESULTS.md). A setting of the user's own is kept.
if "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
from accelerate import PartialState
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

import data
import recipes
import safeguards
from common import (
    TRAINING_INFO,
    ModelSettings,
    check_model_fits_the_machine,
    check_model_weights,
    device_map_for,
    folder_written_whole,
    heldout_summary,
    load_config,
    load_tokenizer,
    parse_settings,
    run_cli,
    setting,
    training_info,
    under_fsdp,
    write_record,
)
from qlora import (
    ATTENTION,
    PRECISIONS,
    QUANT_TYPES,
    count_loss_tokens,
    heldout_loss,
    load_base_model,
    make_bnb_config,
    pick_precision,
    sample_answer,
)

startup.after_the_imports(as_script=__name__ == "__main__")


@dataclass
class Settings(ModelSettings):
    # Step 2. The data set (the base model and the new model's name are in common.ModelSettings)
    dataset_name: str = setting(
        "mlabonne/guanaco-llama2-1k",
        "Hub data set id, or a local .jsonl/.json/.csv/.tsv/.parquet file or a folder of them; the shape (text, "
        "messages, conversations, prompt/completion, instruction/input/output, question/answer) comes from the columns",
    )
    dataset_config: str = setting("", "config name of a Hub data set that has several")
    dataset_split: str = setting("train", "split of a Hub data set to train on")
    text_column: str = setting("", "train on this column's ready-made text (for columns of other names)")
    prompt_column: str = setting("", "with response_column: the column holding the user's turn")
    response_column: str = setting("", "with prompt_column: the column holding the answer")
    loss_on: str = setting(
        "auto",
        "tokens that carry loss. auto: the answers for rows that mark them (chat, prompt/completion, ...), the whole "
        "text for ready-made text rows",
        choices=data.LOSS_ON,
    )
    check_data: bool = setting(False, "load, render and check the data set, print what was found, and stop")

    # Step 3. LoRA
    lora_r: int = setting(64, "rank of the LoRA update matrices: larger learns more and costs more memory")
    lora_alpha: int = setting(16, "LoRA scaling: the update is multiplied by lora_alpha / lora_r")
    lora_dropout: float = setting(0.1, "dropout on the LoRA layers' input")
    lora_target_modules: str = setting(
        "", "layers that get LoRA: comma-separated names, 'all-linear', or empty for peft's default (q_proj,v_proj on Llama)"
    )

    # Step 4. bitsandbytes
    use_4bit: bool = setting(True, "load the base model quantized to 4 bits (QLoRA)")
    bnb_4bit_quant_type: str = setting("nf4", "4-bit data type", choices=QUANT_TYPES)
    use_nested_quant: bool = setting(False, "double quantization: quantize the quantization constants too")
    precision: str = setting(
        "auto",
        "compute dtype of the 4-bit layers and the trainer's mixed precision. auto: bf16 on a GPU of compute "
        "capability >= 8 (the tutorial's step 8 advice, applied), fp16 on older GPUs, fp32 on the CPU",
        choices=PRECISIONS,
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
    save_steps: float = setting(0.1, "save a checkpoint every N steps (below 1: that fraction of the run; 0: none)")
    save_total_limit: int = setting(3, "checkpoints kept in output_dir: older ones are deleted")
    logging_steps: int = setting(25, "log the loss every N steps")
    report_to: str = setting("tensorboard", "where logs go: tensorboard, none, wandb, ...")
    checkpoint_every_n_layers: int = setting(
        1, "with gradient_checkpointing: recompute only every n-th layer (more memory, faster)"
    )
    activation_offloading: bool = setting(False, "with gradient_checkpointing: keep saved activations in CPU memory")
    use_liger_kernel: bool = setting(False, "Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, cross-entropy)")
    torch_compile: bool = setting(False, "compile the model with torch.compile")
    eval_dataset: str = setting(
        "", "eval rows: a split of the Hub data set ('test'), or a second file, folder or Hub id (default: held out)"
    )
    eval_fraction: float = setting(0.05, "without eval_dataset: fraction of the rows held out for eval; 0 for none")
    eval_seed: int = setting(42, "seed of the shuffle that picks the held-out rows")
    eval_steps: int = setting(100, "compute the eval loss every N steps (and at the end)")

    # Step 6. SFT
    max_length: int = setting(1024, "longest row in tokens; longer rows are cut")
    packing: bool = setting(False, "pack several short rows into one sequence")
    padding_free: bool = setting(False, "batch rows end to end with no padding (packing implies it)")
    pad_to_full_length: bool = setting(
        False, "pad every batch to its full size (max_length tokens a row; batch size x max_length when packed): one "
        "shape for every step, so flex attention compiles once instead of again for new lengths (costs the padding)"
    )
    attn_implementation: str = setting(
        "sdpa", "attention kernel; flex_attention keeps packed rows apart on the GPU", choices=ATTENTION
    )
    gpu_recipe: str = setting(
        "auto",
        "speed settings measured on the H200 (recipes.py, bench/RESULTS.md) for the settings still at the tutorial's "
        "value: yours (edited here or on the command line) win. auto: packed rows, flex attention, Liger, and the "
        "fastest memory mode predicted to fit this model in the GPU's free memory (on the CPU, GPUs without bf16 and "
        "under FSDP: tutorial); tutorial: the settings as written; or a memory mode by name",
        choices=recipes.NAMES,
    )
    auto_find_batch_size: bool = setting(
        True, "after an out-of-memory error in training, start again at a smaller batch (transformers' own retry)"
    )

    # After training: the answer printed to check the adapter
    sample_prompt: str = setting("What is a large language model?", "question answered after training")
    sample_max_new_tokens: int = setting(200, "length budget of that answer; 0 skips it")

    # Saving: an adapter an earlier run left in new_model is only replaced when asked
    overwrite_adapter: bool = setting(False, "replace an adapter already in the new_model folder")


# Step 3's settings as peft's LoraConfig, and steps 5 and 6's as trl's SFTConfig (TrainingArguments plus SFT's)
def make_lora_config(settings):
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=safeguards.parse_target_modules(settings.lora_target_modules),
    )


def make_training_config(settings, bf16, has_eval=False):
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
        auto_find_batch_size=settings.auto_find_batch_size,
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
        save_total_limit=settings.save_total_limit,
        logging_steps=settings.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss is logged as one, for StopWhenTrainingBreaks to see
        report_to=settings.report_to,
        bf16=bf16,
        fp16=False,
        max_length=settings.max_length,
        packing=settings.packing,
        padding_free=settings.padding_free,
        pad_to_multiple_of=recipes.full_length(settings) if settings.pad_to_full_length else None,
        dataset_text_field="text",
        # Chat rows come tokenized with their loss masks (data.py finds each answer for any template); trl's own
        # assistant_only_loss would need {% generation %} marks in the template
        assistant_only_loss=False,
        eval_strategy="steps" if has_eval else "no",  # every eval_steps, and once more at the last step
        eval_steps=settings.eval_steps,
        # Without CUDA, processes started by `accelerate launch` train together over gloo on the CPU; without this
        # each would silently train alone on all the rows
        use_cpu=not torch.cuda.is_available(),
        # Every LoRA weight takes part in every step; the trainer cannot tell for a peft model and would otherwise make
        # DDP search the autograd graph for unused weights at each step
        ddp_find_unused_parameters=False,
    )


def held_out_line(summary):
    before, after = summary["before_training"], summary["after_training"]
    return (
        f"held-out loss ({summary['rows']} rows, {summary['tokens']} tokens, loss on {summary['loss_on']}): "
        f"{before:.4f} before training, {after:.4f} after ({100 * (after - before) / before:+.1f}%)"
    )


def main(argv=None, callbacks=()):
    """Steps 7-10 with the settings above; `callbacks` (TrainerCallback objects) let the benchmark time the steps."""
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse_settings(Settings, argv)
    # Before anything loads: settings that cannot work, a model this machine cannot train, the speed settings of
    # this GPU (step 8's check, recipes.py), and the checkpoint of this same run to resume from
    safeguards.check_settings(settings)
    config = load_config(settings.model_name, settings.trust_remote_code)
    if not settings.check_data:  # the check needs no model weights and no GPU
        check_model_fits_the_machine(settings.model_name, config)
    settings, recipe = recipes.pick(settings, recipes.settings_you_chose(Settings, argv), config)
    if not settings.check_data:
        check_model_weights(settings.model_name)
        safeguards.check_target_modules(settings, config)  # the recipe's too: it names all linear layers
    print(recipes.describe(recipe, {name: Settings.__dataclass_fields__[name].default for name in recipe.changes}))
    checkpoint = safeguards.checkpoint_to_resume(settings, recipe.changes)

    # Step 7. Load the data set (data.py: the sources, the shapes, the rendering through the chat template, the
    # check), tokenized by the model's tokenizer (step 9's: padding with EOS, on the right)
    tokenizer = load_tokenizer(settings.model_name, settings.trust_remote_code)
    dataset = data.prepare_data(settings, tokenizer)  # stops here, with one line, on data nothing can be learnt from
    if settings.check_data:
        return dataset

    # Step 8. The compute dtype (the tutorial's bf16 check, applied) and the 4-bit set-up: BitsAndBytesConfig
    compute_dtype, bf16 = pick_precision(settings.precision)
    bnb_config = make_bnb_config(settings, compute_dtype)

    # Step 9. The training arguments (SFTConfig), the base model in 4 bits (from_pretrained), LoRA, SFTTrainer.
    # SFTConfig comes first: it sets up the processes `accelerate launch` started (the only one in a plain run),
    # which the device map and the main-process checks read
    training_config = make_training_config(settings, bf16, dataset.eval is not None)
    # Every process runs this function; only the main one prints, saves and answers (the trainer keeps its logs and
    # checkpoints to it too)
    is_main_process = PartialState().is_main_process
    device_map = device_map_for()
    if is_main_process:
        print(f"4-bit compute dtype: {compute_dtype}, trainer bf16: {bf16}, device: {device_map['']}")
        if settings.attn_implementation == "flex_attention":
            # 54 s on the H200 with empty caches; PyTorch keeps the compiled kernels on disk for later runs
            print("flex attention: the first step compiles it, about a minute on a machine's first run")
    model = load_base_model(settings, bnb_config, device_map)
    ctrl_c = safeguards.SaveOnCtrlC()
    trainer = SFTTrainer(
        model=model,
        args=training_config,
        train_dataset=dataset.train,
        eval_dataset=dataset.eval,
        processing_class=tokenizer,
        peft_config=make_lora_config(settings),
        callbacks=[ctrl_c, safeguards.StopWhenTrainingBreaks(), *callbacks],
    )
    trainer.add_callback(safeguards.KeepAdapterDtypes(trainer.model))
    trainer.add_callback(recipes.SmallerBatchAfterOutOfMemory(trainer.data_collator, settings))

    # Step 10. Train (or resume this run), save the adapter, measure it and let it answer one question.
    # The held-out loss before and after training, on the eval rows as the trainer scores them. Under FSDP a forward
    # needs every process in step (and the trainer wraps the model only in train()): its eval_loss is logged instead
    heldout = None
    if dataset.eval is not None and not under_fsdp():
        heldout = data.loss_rows(dataset.eval, tokenizer, dataset.answers_only, settings.max_length)
        with trainer.model.disable_adapter():
            before = heldout_loss(trainer.model, heldout)
    if is_main_process:
        safeguards.save_run_settings(settings, recipe.changes)
    with ctrl_c.listening(), recipes.no_batch_fits_is_one_line():
        safeguards.train_or_resume(trainer, checkpoint)
    if ctrl_c.requested:
        print(
            f"stopped: checkpoint of step {trainer.state.global_step} saved in {settings.output_dir}. "
            "Run the same command again to resume from it",
            file=sys.stderr,
        )
        sys.exit(130)  # the shell's status for Ctrl-C: a script running this then merge_and_push.py stops here
    if dataset.eval is not None and is_main_process:
        final_eval = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
        if final_eval:
            print(f"eval loss at step {final_eval['step']}: {final_eval['eval_loss']:.4f}")

    # Every process calls save_model (under FSDP the adapter is gathered from all of them); only the main one writes,
    # and only it moves the finished folder, training_info.json in it, into place
    with folder_written_whole(settings.new_model, main_process=is_main_process) as folder:
        trainer.save_model(folder)  # the adapter (not the base model) and the tokenizer
        summary = None
        if heldout is not None:  # measured after the save, so it is the saved adapter's loss
            after = heldout_loss(trainer.model, heldout)
            summary = heldout_summary(len(heldout), count_loss_tokens(heldout), dataset.answers_only, before, after)
        if is_main_process:
            if summary:
                print(held_out_line(summary))
            answer = None
            if under_fsdp():
                # Each GPU holds a shard of the model: generating would need every process in step with the main one
                print("no sample answer under FSDP (the model is sharded across the GPUs): try the merged model")
            elif settings.sample_max_new_tokens > 0:
                answer = sample_answer(trainer.model, tokenizer, settings.sample_prompt, settings.sample_max_new_tokens)
                print(f"{settings.sample_prompt}\n>>> {answer}")
            write_record(folder, TRAINING_INFO, training_info(settings, trainer.state, answer, summary))
    if is_main_process:
        print(f"adapter saved to {settings.new_model}")
    return trainer


if __name__ == "__main__":
    run_cli(main)
