"""The user-facing layer: command line, peer process, HTTP API, chat, dashboard.

Modules (imports go down to pipeline/, credits/, dht/, p2p/; nothing below imports potluck):
    cli.py            `potluck id | serve | chat | status | credits | swarm new-key`
    startup.py        refusals before a peer starts: ports in use, malformed addresses (exit 2)
    peer.py           one peer process: wires overlay, DHT, credits, block server and client together
    relays.py         relay announcements: the signed `relays/<swarm>` DHT record, its validator, the relays heard of
    autorelay.py      behind NAT with no `--relay`: choosing relays from those announcements, replacing failed ones
    control.py        the local control socket `potluck status` and friends talk to
    memory.py         the peer process gives big freed blocks back to the OS (glibc's mmap threshold); room checks
    generation.py     one generation for every front door: request checks, the typed result, error mapping
    openai_schema.py  the OpenAI wire format: request parsing, response and chunk shapes
    api.py            the HTTP face: OpenAI-compatible endpoints, /api/status, /api/credits, /api/usage, the dashboard
    apps.py           many applications behind one API: per-app keys, quotas per minute, metering
    fallback.py       an OpenAI-compatible upstream that answers when the swarm cannot
    localfallback.py  `--fallback local`: this peer answers with its own unannounced copy of the model
    swarmview.py      a model's coverage as one peer sees it (replicas, throughput, longest request)
    status.py         `potluck status` / `potluck credits` as tables that fit 80 columns
    chat.py           `potluck chat` in the terminal
    localswarm.py     real `potluck serve` processes on this machine (the demo, the tests)
    demo.py           the main job: a local swarm answers a prompt
"""
