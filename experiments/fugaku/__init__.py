"""Running on Fugaku (A64FX, Tofu-D): a pjsub job writer with the memory check and rank map (job.py), the job
script template (job.sh.in) and the per-process start-up under the job scheduler (launch.py)."""
