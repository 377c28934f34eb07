"""What the tests build on, imported as `testkit.*` (pytest puts tests/ on sys.path):

    models   tiny random-weight HF models (Llama, Qwen2, Mistral); whether the default model's wheel is installed
    swarms   swarms of BlockServers and clients, on the simulator or on real libp2p sockets
    billing  peers of such a swarm with a credit ledger: billed servers and clients
    processes  what tests do to swarms of real `potluck serve` processes (kill the serving replica)
    golibp2p   a real go-libp2p node (p2pd from the hivemind wheel) driven with p2pclient
    throttle   a cgroup capping a real process at a fraction of a core (a slow server on this machine)
"""
