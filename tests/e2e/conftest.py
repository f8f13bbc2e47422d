from e2e_support import portal_env, redis_url, start_worker, web_app  # noqa: F401  (fixtures)
