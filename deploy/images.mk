# `make images`: the FedSense deployment image, built offline.
# Included by the top-level Makefile (include deploy/images.mk).
#   1. deploy/wheelhouse.sh           runtime wheels from the tested venv's pins (skipped when unchanged)
#   2. deploy/ci/build-base-image.sh  debootstrap bookworm + python3 as $(BASE_IMAGE) (skipped when present)
#   3. deploy/docker/build-image.sh   docker build --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE)
IMAGE ?= fedsense:latest
BASE_IMAGE ?= fedsense/base:bookworm

# $(STAMP) (the top-level Makefile's venv): the wheelhouse pins are that venv's `pip freeze`.
.PHONY: images
images: $(STAMP)
	bash deploy/wheelhouse.sh
	BASE_IMAGE=$(BASE_IMAGE) bash deploy/ci/build-base-image.sh
	IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) bash deploy/docker/build-image.sh

# `make monitoring-image`: Debian's prometheus package as an image of its own (debootstrap, like the base
# image), for `docker compose --profile monitoring up` (README "Tracking and monitoring").
PROMETHEUS_IMAGE ?= fedsense/prometheus:bookworm
.PHONY: monitoring-image
monitoring-image:
	BASE_IMAGE=$(PROMETHEUS_IMAGE) BASE_PACKAGES="prometheus ca-certificates" bash deploy/ci/build-base-image.sh
