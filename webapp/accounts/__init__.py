"""Users, roles and API tokens: one audited service (service) that the admin page (routes) and the CLI (cli) call."""
