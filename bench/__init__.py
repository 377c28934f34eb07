"""Benchmarks: `python -m bench.NAME --json` prints one JSON object of figures against a same-run baseline.

Every bench takes `--quick` (small sizes, seconds), which tests/test_bench_quick.py runs:
    hop         one libp2p hop vs raw trio TCP (round trip, throughput)
    gossip_sim  gossip reach and cost on the simulator vs an ideal flood
    dht_sim     clustered vs plain Kademlia on one simulated topology
    ledger      credit-log sign/verify/store rates and spread
    spotcheck   spot checks: honest noise vs tolerance, liars caught, checker compute (adaptive vs fixed 2 %)
    pipeline    SmolLM2 through real server processes vs local generation
    netns       the namespace lab's figures (needs root)
    placement   --blocks auto on a simulated swarm: blocks with 2 replicas vs what memory allows (vs the throughput rule);
                concurrent requests spread over it by load (vs routes blind to load)
    model_demand  volunteers choosing among models by demand per copy: worst model's coverage per demand vs the
                best split (vs choices blind to coverage or demand); Sybil demand with and without the caps
    attack      attacks on a real peer: its RSS, whether it stays up, what the attacker got, an honest client beside
    fuzz        every wire and stored-data decoder against fuzzed inputs (bench.fuzzgen makes them)
And what the attack bench and the hostile tests send: hostile.py; the processes benches start: pipeline_client.py
(pipeline's concurrent users), netns_client.py (netns's far user), liarpeer.py (spotcheck's lying server) — none of them a bench.
"""
