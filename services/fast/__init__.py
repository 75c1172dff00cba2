"""The fast instances: routes that answer in microseconds and must stay that way under any heavy load.

    app               the routes (/fast, POST /echo, /healthz, /metrics) and main()
    fanout_routes     routes that call backends (/profile/<id>, /search, /lookup): services/fanout at work
    negative_control  test-only sabotage (observe.test_fast_delay_ms): a fleet the isolation proof must FAIL
"""
