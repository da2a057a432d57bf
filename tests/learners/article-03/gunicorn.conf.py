# The article's Gunicorn command, as the config file the chapter's command reads:
#   gunicorn app:create_app --bind 0.0.0.0:8080 \
#     --worker-class aiohttp.GunicornWebWorker --workers 4
wsgi_app = "app:create_app"
bind = "0.0.0.0:8080"
worker_class = "aiohttp.GunicornWebWorker"
workers = 4
