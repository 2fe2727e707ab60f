"""Rendered test routes: a camera driving a closed loop through a pybullet world, written as a rosbag2.

- ``simulate``: ``simulate_route`` (what the ``simulate_route`` executable runs).
- ``route``: ``Route``, the loop every world is driven along; ``world``: the town and ``Scene``;
  ``garden`` and ``garden_layout``: the held-out garden world.
- ``appearance``: light, weather, clutter and drive of a traversal (``Appearance``, ``CONDITIONS``).
- ``meshes``: triangle meshes and textures.

Imports only the package floor; nothing but ``cli`` and the tests imports it.
"""
