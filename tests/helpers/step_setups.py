"""Training set-ups shared by the step tests (host syncs, fullgraph compile): a nano model of
each kind and a few micro-batches ``(Batch, plan)`` as the training loop feeds them."""
import torch

from multimae.core.batch import Batch
from multimae.core.config import load_config
from multimae.data.transfer import TARGET, TARGET_VALID
from multimae.tasks.finetune import FinetuneObjective, build_loss
from multimae.tasks.finetune_config import FinetuneConfig
from multimae.tasks.pretrain import PretrainTask
from multimae.tasks.pretrain_config import PretrainConfig
from multimae.model.transfer import HeadConfig, TransferModel, TransferModelConfig
from tiny import TINY_OVERRIDES, tiny_config

NANO = TINY_OVERRIDES + [
        "data.num_samples=12", "data.num_workers=0", "data.cache=false", "mask.num_visible=12",
        "train.batch_size=4", "train.resume=null"]
STEPS = 3


def pretrain_micros(config: str, *extra: str):
    task = PretrainTask(load_config(PretrainConfig, config, NANO + list(extra) + ["train.out_dir=unused"]))
    task.build(torch.device("cpu"), None)
    loader, _ = task.loader(0, 1)
    micros = [m for _, m in zip(range(STEPS), loader)]
    return task.model, micros


def finetune_micros(kind: str, head: HeadConfig, config: str):
    cfg = load_config(FinetuneConfig, config, [])
    enc = tiny_config()
    model = TransferModel(TransferModelConfig(encoder=enc, inputs=["rgb"], head=head, drop_path=0.1))
    objective = FinetuneObjective(model, build_loss(cfg), kind)
    g = torch.Generator().manual_seed(0)
    micros = []
    for _ in range(STEPS):
        t = {"rgb": torch.randn(4, 3, 32, 32, generator=g)}
        if head.kind == "classification":
            t[TARGET] = torch.randint(0, 4, (4,), generator=g)
        elif head.kind == "segmentation":
            t[TARGET] = torch.randint(0, 6, (4, 32, 32), generator=g)
            t[TARGET][0] = cfg.data.ignore_index  # a sample of padding only
        else:
            t[TARGET] = torch.rand(4, 1, 32, 32, generator=g)
            t[TARGET_VALID] = torch.rand(4, 1, 32, 32, generator=g) > 0.3
        micros.append((Batch(t), None))
    return objective, micros
