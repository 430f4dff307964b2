"""Autoscaling policies (heuristic and learned) behind one ``predict()`` protocol, plus evaluation."""
