models_path = "/models"
