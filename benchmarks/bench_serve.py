"""How fast does `lessonlib serve` answer single-image predictions on 2 CPU cores?

Exports a model (the tiny 32-px CNN of `lessonlib.serve.tiny_export`, and an untrained resnet18 at 64 px: speed does
not depend on the weights), starts `lessonlib serve` on 127.0.0.1 in a subprocess pinned to 2 cores, then sends
single-image POST /predict requests (a 640x480 JPEG, like a small phone photo): first one at a time (latency), then
from `--clients` threads at once (throughput). Bounded by `--n` requests and `--seconds` per phase.
Prints predictions per second and latency median / 95th percentile. The client runs on the same machine.
Torch's intra-op threads in the server (OMP_NUM_THREADS) are set by `--threads`: on a machine whose cores are busy
with other work, 2 threads can be far slower than 1 (the threads wait for each other).

Usage: python benchmarks/bench_serve.py [--n 200] [--seconds 30] [--clients 4] [--cores 0,1] [--threads 1,2]
                                        [--models tiny,resnet18]
"""
import argparse, io, os, socket, statistics, subprocess, sys, tempfile, time, warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import httpx
from PIL import Image


def export_model(kind: str, folder: Path) -> Path:
    "Export the model `kind` ('tiny' or 'resnet18') to `folder`."
    from lessonlib.serve import tiny_export
    if kind == 'tiny': return tiny_export(folder/'tiny.pkl')
    from lessonlib.lessons.scratch import read_image_folder, scratch_dls
    from lessonlib.synth.scratch import make_scratch
    from lessonlib.vision.models import vision_learner
    dls = scratch_dls(read_image_folder(make_scratch(), check_images=False), size=64, bs=16)
    return vision_learner(dls, 'resnet18', pretrained=False, path=folder).export('resnet18.pkl')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(model: Path, cores: str, threads: int):
    "`lessonlib serve model` on a free port, pinned to `cores`; returns (process, url) once /health answers."
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, '-c', 'import sys; from lessonlib.cli import main; sys.exit(main(sys.argv[1:]))', 'serve', str(model), '--port', str(port), '--feedback',
           str(model.with_suffix('.db'))]
    if cores and Path('/usr/bin/taskset').exists(): cmd = ['taskset', '-c', cores] + cmd
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f'http://127.0.0.1:{port}'
    for _ in range(600):
        try:
            if httpx.get(url + '/health', timeout=1).status_code == 200: return proc, url
        except httpx.HTTPError: pass
        if proc.poll() is not None: raise RuntimeError(proc.stderr.read().decode()[-2000:])
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError('the server did not start in 60 s')


def photo() -> bytes:
    b = io.BytesIO()
    Image.effect_noise((640, 480), 60).convert('RGB').save(b, format='JPEG', quality=85)
    return b.getvalue()


def one(client, data) -> float:
    t = time.perf_counter()
    r = client.post('/predict', files={'file': ('p.jpg', data, 'image/jpeg')})
    r.raise_for_status()
    return time.perf_counter() - t


def phase(url, data, n, seconds, clients) -> dict:
    "`n` requests (or as many as fit in `seconds`) from `clients` threads; latencies and throughput."
    end = time.perf_counter() + seconds
    def worker(k):
        lat = []
        with httpx.Client(base_url=url, timeout=60) as c:
            while len(lat) < k and time.perf_counter() < end: lat.append(one(c, data))
        return lat
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex: lats = sum(ex.map(worker, [n // clients] * clients), [])
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lats, n=20)
    return dict(n=len(lats), per_s=len(lats) / wall, median_ms=1000 * statistics.median(lats), p95_ms=1000 * q[18])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=200)
    ap.add_argument('--seconds', type=float, default=30)
    ap.add_argument('--clients', type=int, default=4)
    ap.add_argument('--cores', default='0,1')
    ap.add_argument('--models', default='tiny,resnet18')
    ap.add_argument('--threads', default='1,2', help='torch threads in the server, each tried')
    a = ap.parse_args()
    data = photo()
    print(f'{len(data) / 1024:.0f} kB JPEG 640x480; server pinned to cores {a.cores}; at most {a.n} requests or '
          f'{a.seconds:.0f} s per phase')
    print('| model | threads | clients | requests | predictions/s | median ms | p95 ms |\n|---|---|---|---|---|---|---|')
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for kind in a.models.split(','):
            model = export_model(kind, Path(tmp))
            for threads in [int(t) for t in a.threads.split(',')]:
                proc, url = start_server(model, a.cores, threads)
                try:
                    with httpx.Client(base_url=url, timeout=60) as c:
                        for _ in range(5): one(c, data)    # warm-up
                    for clients in (1, a.clients):
                        r = phase(url, data, a.n, a.seconds, clients)
                        print(f"| {kind} | {threads} | {clients} | {r['n']} | {r['per_s']:.1f} | {r['median_ms']:.1f} | "
                              f"{r['p95_ms']:.1f} |", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(10)


if __name__ == '__main__': main()
