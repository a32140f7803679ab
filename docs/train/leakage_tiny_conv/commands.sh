#!/bin/bash
cd /work/main; export OMP_NUM_THREADS=2
C="--model.init_args.expression_encoder tiny_conv --trainer.max_epochs 6 --trainer.check_val_every_n_epoch 6 --trainer.logger.init_args.save_dir outputs/train/leak"
s=$(date +%s); .venv/bin/python -m emojidiff.cli fit -c configs/decoupled.yaml $C --trainer.logger.init_args.name idi --model.init_args.export_dir outputs/train/leak/idi/model > outputs/leak_idi.log 2>&1; echo "idi $? $(( $(date +%s)-s ))" >> outputs/leak_times.txt
s=$(date +%s); .venv/bin/python -m emojidiff.cli fit -c configs/decoupled.yaml -c configs/ablations/self_pairs.yaml $C --trainer.logger.init_args.name self --model.init_args.export_dir outputs/train/leak/self/model > outputs/leak_self.log 2>&1; echo "self $? $(( $(date +%s)-s ))" >> outputs/leak_times.txt
s=$(date +%s); .venv/bin/python -m benchmarks.evaluation.evaluate -c docs/train/leakage_tiny_conv/eval_config.yaml > outputs/leak_eval.log 2>&1; echo "eval $? $(( $(date +%s)-s ))" >> outputs/leak_times.txt
.venv/bin/python -m benchmarks.evaluation.compare results/leak_tiny_conv/scores.json --pairs '[tiny-conv-idi:tiny-conv-self-pairs]' >> outputs/leak_eval.log 2>&1
