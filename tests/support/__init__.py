"""What the tests share, one role a module:

    fleet         a private fleet: settings, ports, the commands a user runs, requests to it
    waiting       wait_for / eventually: poll the real state instead of sleeping
    running_jobs  knowing that a heavy job runs (its process tells), and a job beside a running one
    probe         a request sent again and again in the background while a fault happens
    contract      the contract's JSON error, checked on a response
    raw_http      raw bytes to a port, the answer read back
    sse           a job's event stream read event by event, as a browser's EventSource reads it
    app_case      an app in process on an unused port, asked through real HTTP
    fake_pools    pools that run no process, for the slow app's tests
    faulty_tasks  test-only tasks that raise, crash, overrun, fail their setup, start processes
    reply_tasks   a result that pickles in the worker but does not unpickle in the server
    cgroups       which cpu cgroup a process is in
    netns         simulated hosts: network namespaces on a bridge
"""
