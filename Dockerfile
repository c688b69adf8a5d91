# nemo-upcycle on an NGC PyTorch container: torch, Transformer Engine and apex come with the image.
#   docker build -t nemo-upcycle .
#   docker run --gpus all --rm -it -v $PWD/ckpts:/ckpts nemo-upcycle nemo-upcycle --help
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /opt/nemo-upcycle
COPY . .

# Pin what the image already has (torch, Transformer Engine, apex) so pip keeps it instead of pulling
# PyPI builds, then install the project with its GPU and evaluation extras.
RUN pip list --format=freeze \
        | grep -iE '^(torch|transformer[-_]engine[-_a-z]*|apex|flash[-_]attn)==' > /tmp/keep.txt \
    && pip install --no-cache-dir --constraint /tmp/keep.txt -e ".[gpu,eval]" \
    && python -c "import torch, transformer_engine.pytorch, megatron.core, nemo_upcycle; print('ok', torch.__version__)"

ENV HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
CMD ["nemo-upcycle", "--help"]
