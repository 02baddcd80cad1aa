from osteonode.cli import app

app()
