"""Every trainer setting with its default. Other configs start from this one and override what they change.

Key names follow diffusers' examples/dreambooth/train_dreambooth.py flags where one exists.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  # Model.
  c.pretrained_model_name_or_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or local folder
  c.variant = ""  # e.g. "fp16" to read *.fp16.safetensors
  c.single_file_config = "auto"  # single-file .safetensors model: "auto" | "sd15" | "sd21" | a diffusers folder
  c.random_init = False  # build the model from its config.json files with random weights (tiny offline model)
  # Data.
  c.instance_data_dir = ""  # "" = the bundled dog photos
  c.instance_prompt = "a photo of sks dog"
  c.class_data_dir = ""  # "" = WORKDIR/class_images
  c.class_prompt = "a photo of dog"
  c.with_prior_preservation = True
  c.prior_loss_weight = 1.0
  c.num_class_images = 200
  c.resolution = 512  # 0 = the model's own (SD 1.5: 512, SD 2.1: 768, SDXL: 1024)
  c.center_crop = True
  c.random_flip = False
  c.on_bad_image = "error"  # or "skip"
  c.cache_latents = True  # cache VAE posteriors (needs center_crop) and frozen text embeddings
  # Class-image generation (prior preservation).
  c.sample_batch_size = 4
  c.class_generation_steps = 50
  c.class_guidance = 7.5
  # Sampler of class images, validation and in-training evaluation: ddim | dpmpp_2m | euler | euler_a, equal to
  # diffusers' schedulers built from the model's scheduler config; Karras sigmas for dpmpp_2m and euler.
  # Flux: flow_euler (its only sampler); class_guidance and validation_guidance are then its distilled guidance.
  c.sample_scheduler = "ddim"
  c.sample_karras = False
  # Optimisation.
  c.train_batch_size = 1  # instance images per step (the same number of class images is added)
  c.learning_rate = 5e-6
  c.text_encoder_lr = 0.0  # 0 = same as learning_rate
  c.lr_scheduler = "constant"  # constant | constant_with_warmup | linear | cosine
  c.lr_warmup_steps = 0
  c.max_train_steps = 800
  c.gradient_accumulation_steps = 1
  c.max_grad_norm = 1.0
  c.adam_beta1 = 0.9
  c.adam_beta2 = 0.999
  c.adam_weight_decay = 1e-2
  c.adam_epsilon = 1e-8
  c.optimizer_moments_bf16 = False
  c.train_text_encoder = False
  # master params (and so gradients and Adam moments): "float32" | "bfloat16" (updated with stochastic rounding,
  # since lr-sized updates are far below bf16's resolution and would be lost to round-to-nearest)
  c.param_dtype = "float32"
  c.mixed_precision = "bf16"  # "no" (fp32) | "bf16" (bf16 compute, fp32 master params)
  c.remat = "none"  # none | full | dots | attention: recompute UNet blocks on the backward pass (memory for compute)
  # auto: cuDNN flash attention on GPUs (bf16/fp16), else XLA | xla | cudnn | chunked: exact attention over
  # 1024-query chunks, recomputed on the backward pass (no full score matrix: the memory lever on TPU and CPU)
  c.attention = "auto"
  c.snr_gamma = 0.0  # 0 = off; 5.0 is the usual min-SNR value
  # v-prediction only: "min_snr" = min(snr, gamma) / (snr + 1) (the paper; diffusers' train_dreambooth.py) |
  # "snr_plus_one" = min(snr + 1, gamma) / (snr + 1) (older diffusers train_text_to_image.py)
  c.snr_weighting = "min_snr"
  c.offset_noise = 0.0  # 0 = off; 0.1 as diffusers' --offset_noise
  # Flux (flow matching), as diffusers' train_dreambooth_lora_flux.py: timesteps drawn by weighting_scheme (none |
  # sigma_sqrt | logit_normal | mode | cosmap; noise-schedule models take only "none"), which also weights the loss
  # (sigma_sqrt, cosmap); logit_normal's mean/std; mode's scale
  c.weighting_scheme = "none"
  c.logit_mean = 0.0
  c.logit_std = 1.0
  c.mode_scale = 1.29
  c.guidance_scale = 3.5  # the distilled guidance input during training (guidance_embeds models: FLUX.1-dev)
  c.max_sequence_length = 0  # T5 prompt tokens (Flux only); 0 = the T5 tokenizer's model_max_length (FLUX.1: 512)
  c.seed = 0
  # Parallelism: mesh axis sizes (-1 = all remaining devices).
  c.mesh_data = -1
  c.mesh_fsdp = 1
  c.device_memory_gib = 0.0  # 0 = ask the device (GPU/TPU); the memory plan refuses configs that exceed it
  # Checkpoints, logging, validation, export.
  c.checkpointing_steps = 200
  c.checkpoints_total_limit = 2
  c.validation_prompt = "a photo of sks dog in a bucket"
  c.validation_steps = 200  # 0 = never
  c.num_validation_images = 4
  c.validation_inference_steps = 25
  c.validation_guidance = 7.5
  # In-training evaluation (the paper's metrics) and best-checkpoint selection; 0 = off.
  c.eval_steps = 0
  c.eval_metric = "dino"  # dino | clip_i | clip_t: the checkpoint with the highest value is kept (best.json)
  c.eval_prompts = ()  # () = the validation prompt
  c.eval_images_per_prompt = 4
  c.eval_dino_model = "facebook/dino-vits16"  # transformers folder or hub id
  c.eval_clip_model = "openai/clip-vit-large-patch14"
  c.eval_lpips_model = ""  # LPIPS backbone weights (see dreambooth_jax.evaluate --lpips_model): adds DIV; "" = off
  c.eval_lpips_net = "alex"  # alex | vgg
  c.export_at_end = True
  c.export_dtype = ""  # "" = float32; "float16" for smaller files
  # LoRA (Hu et al. 2021): train only low-rank factors on the UNet attention projections (and optionally more).
  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = False
  c.lora.rank = 4
  c.lora.alpha = ml_collections.FieldReference(None, field_type=float)  # None = rank (scale 1)
  c.lora.dropout = 0.0
  c.lora.init = "kaiming"  # PEFT's default; or "gaussian"
  c.lora.feed_forward = False  # also ff.net.0.proj / ff.net.2 of the UNet transformer blocks
  c.lora.text_encoder = False  # LoRA on the text encoder's q/k/v/out_proj too
  c.lora.text_mlp = False  # and its fc1/fc2
  # continue training from a LoRA file (kohya, diffusers or PEFT; its rank and targets must match lora.*); "" = off
  c.init_lora = ""
  return c
