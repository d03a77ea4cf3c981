"""``python -m safety_neurons stage=<name> model=<name> [overrides]`` (also under ``accelerate launch``)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from .cfg import CONF_DIR, setup
from .errors import UserError

setup()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from .stages import run_stage

    try:
        run_stage(cfg)
    except UserError as e:  # one line naming the problem and the fix; earlier artifacts untouched
        logging.getLogger("safety_neurons").debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from .cfg import check_overrides

    try:  # a bad override is one line and exit 2, like every other bad input
        check_overrides(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
